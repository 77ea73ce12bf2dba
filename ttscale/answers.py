"""Answer extraction, equivalence and voting: pure functions.

Extraction order for math: the last `\\boxed{...}` (nested braces allowed), then "(final) answer is X"
(or "answer: X" / "answer = X"), then a line "**Answer**: X", then the last number in the text,
as GSM8K-style graders do. A trace cut at `max_tokens` (`truncated`) gets no answer from that last number
(nor, for free text, from its last line): it stopped mid-reasoning, so where its text ends is no answer.
Multiple choice: a boxed letter, "answer is (B)", or a lone letter on the last line.
Equivalence goes through `math-verify` (with a time limit per comparison), after a cheap string match.
Free text (`kind="free"`): when no pattern matches, the answer is the last non-empty line, and answers are
the same when their `normalize_free` forms are (case, whitespace and punctuation ignored).
Reasoning models: only the section after the last `</think>` is read (`split_reasoning`); a trace that opened
`<think>` and never closed it has no answer yet.

Vote tie rule: the class with the greatest total weight wins; equal weights go to the class whose
earliest member finished first (lowest `order`), so ties are broken deterministically by finish time.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FINAL = re.compile(r"(?:final )?answer\s*(?:is|:|=)\s*[:：]?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_ANSWER = re.compile(r"(?:^|\n)\s*\**answer\**\s*[:：]\s*(.+)", re.IGNORECASE)
_CHOICE_PATTERNS = [
    re.compile(r"answer\s*(?:is|:)?\s*[:：]?\s*\(?\**\s*([A-Z])\s*\**\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"^\s*\(?([A-Z])\)?[.)]?\s*$", re.MULTILINE),
]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(thinking, answer section) of a trace: split on the last `</think>`, as vLLM's reasoning parsers do.
    Text without `<think>` is all answer; text that opened `<think>` and never closed it is all thinking."""
    if THINK_CLOSE in text:
        head, _, tail = text.rpartition(THINK_CLOSE)
        head = head.strip()
        return head.removeprefix(THINK_OPEN).strip(), tail.lstrip()
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):].strip(), ""
    return "", text


def split_reasoning_partial(text: str) -> tuple[str, str]:
    """`split_reasoning` of a trace still being generated, with both parts growing only by appending as text
    arrives: thinking is not stripped, and a tail that may be the start of `<think>` / `</think>` is held back."""
    if THINK_CLOSE in text:
        head, _, tail = text.rpartition(THINK_CLOSE)
        return head.lstrip().removeprefix(THINK_OPEN), tail.lstrip()
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        thinking = stripped[len(THINK_OPEN):]
        held = next((k for k in range(len(THINK_CLOSE) - 1, 0, -1) if thinking.endswith(THINK_CLOSE[:k])), 0)
        return thinking[:len(thinking) - held], ""
    if stripped and THINK_OPEN.startswith(stripped):
        return "", ""
    return "", text


def last_line(text: str) -> str | None:
    """The last non-empty line, without list markers or emphasis: a free-text trace's final answer."""
    for line in reversed(text.strip().splitlines()):
        line = re.sub(r"^\s*(?:[-*>#]+\s*)+", "", line).strip().strip("*_").strip()
        if line:
            return line
    return None


def normalize_free(answer: str) -> str:
    """Free-text canonical form: Unicode NFKC, lower case, punctuation dropped, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", answer).lower()
    s = "".join(c if c.isalnum() or c.isspace() else " " for c in s)
    return " ".join(s.split())


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}`, braces balanced; None if absent or unclosed."""
    last = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            last = text[m.end(): i - 1].strip()
    return last


def _clean_tail(s: str) -> str:
    s = s.strip().splitlines()[0].strip() if s.strip() else ""
    s = s.strip("*").strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    return s.rstrip(".").strip()


def extract_answer(text: str, kind: str = "math", choices: Sequence[str] | None = None, *,
                   truncated: bool = False) -> str | None:
    """The answer a trace commits to (read from its answer section, after `</think>`), or None.

    `truncated`: the trace was cut at `max_tokens` (finish reason `length`); the fallbacks that read where
    the text ends (its last number, a free text's last line) do not apply."""
    text = split_reasoning(text or "")[1]
    if not text.strip():
        return None
    boxed = extract_boxed(text)
    if kind == "choice":
        letters = {chr(ord("A") + i) for i in range(len(choices or [])) } or set("ABCDEFGHIJ")
        if boxed:
            m = re.fullmatch(r"\(?\s*(?:\\text\{)?([A-Z])\}?\s*\)?", boxed.strip())
            if m and m.group(1) in letters:
                return m.group(1)
        for pat in _CHOICE_PATTERNS:
            found = [g for g in pat.findall(text) if g.upper() in letters]
            if found:
                return found[-1].upper()
        return None
    if boxed is not None:
        return boxed
    finals = _FINAL.findall(text)
    if finals:
        cand = _clean_tail(finals[-1])
        inner = extract_boxed(cand)
        return inner if inner is not None else (cand or None)
    answers = _ANSWER.findall(text)
    if answers:
        return _clean_tail(answers[-1]) or None
    if truncated:
        return None
    if kind == "math":
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    if kind == "free":
        return last_line(text)
    return None


def normalize(answer: str) -> str:
    """Cheap canonical form for the fast path (spaces, `\\left`, `\\!`, trailing period, dollar signs)."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\(?:left|right|!|,|;|\s)", "", s)
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").lower()


@lru_cache(maxsize=65536)
def _parsed(answer: str, timeout: int | None) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = answer if "$" in answer else f"${answer}$"
    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    out = parse(text, extraction_config=cfg, parsing_timeout=timeout)
    if not out:
        out = parse(answer, extraction_config=cfg, parsing_timeout=timeout)
    return out


def _timeout(seconds: int) -> int | None:
    # math-verify's time limit uses SIGALRM, which only works in the main thread.
    return seconds if threading.current_thread() is threading.main_thread() else None


_UNTIMED = threading.local()  # `active` while this module calls math-verify without a time limit on purpose


class _ExpectedNoTimeout(logging.Filter):
    """Drops math-verify's "Timeout is disabled ..." warning while `equivalent` calls it off the main thread,
    where passing no time limit is the point (`_timeout`); its other records, and that warning for anyone
    else's call, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_UNTIMED, "active", False) and record.getMessage().startswith("Timeout is disabled"))


_EXPECTED_NO_TIMEOUT = _ExpectedNoTimeout()
for _name in ("math_verify.parser", "math_verify.grader"):  # the loggers math-verify warns on
    logging.getLogger(_name).addFilter(_EXPECTED_NO_TIMEOUT)


@contextlib.contextmanager
def _untimed(on: bool) -> Iterator[None]:
    """Mark the math-verify calls inside as deliberately without a time limit (when `on`)."""
    before = getattr(_UNTIMED, "active", False)
    _UNTIMED.active = on or before
    try:
        yield
    finally:
        _UNTIMED.active = before


# Currency marks around a number (GSM8K answers are often money): `\$18`, `$18.00`, `\text{\$}18`, `18 USD`.
_CURRENCY = re.compile(r"\\text\{\s*\\?\$\s*\}|\\\$|\\textdollar|[$€£¥]|\bUSD\b|\bEUR\b")
_DISPLAY = re.compile(r"^\s*(?:\\\[|\\\()(.*?)(?:\\\]|\\\))\s*$", re.DOTALL)
# A number followed only by words ("18 dollars", "5 eggs", "3.5 hours"): the number. Words of 2+ letters, so
# "5 x" or "2\\pi" stay expressions; names math-verify reads as math are kept whole.
_NUMBER_THEN_WORDS = re.compile(r"^\s*(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s+((?:[A-Za-z]{2,}[.']?\s*)+)$")
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "and", "or", "degrees", "infty"}


def plain_answer(answer: str) -> str:
    """A math answer without what only dresses it: display-math delimiters (`\\[...\\]`, `\\(...\\)`),
    currency marks, and unit words after a lone number (`18 dollars` -> `18`). Left as it is otherwise."""
    s = answer.strip()
    m = _DISPLAY.match(s)
    if m:
        s = m.group(1).strip()
    s = _CURRENCY.sub("", s).strip()
    m = _NUMBER_THEN_WORDS.match(s)
    if m and not any(w.lower().strip(".'") in _MATH_WORDS for w in m.group(2).split()):
        s = m.group(1)
    return s or answer.strip()


@lru_cache(maxsize=65536)
def equivalent(a: str | None, b: str | None, timeout_s: int = 5) -> bool:
    """Whether two extracted answers mean the same thing (`\\frac{1}{2}`, `0.5` and `1/2` do; so do `\\$18`,
    `18 dollars` and `18`)."""
    if a is None or b is None:
        return False
    a, b = plain_answer(a), plain_answer(b)
    if normalize(a) == normalize(b):
        return True
    from math_verify import verify

    t = _timeout(timeout_s)
    try:
        with _untimed(t is None):
            pa, pb = _parsed(a, t), _parsed(b, t)
            if not pa or not pb:
                return False
            return bool(verify(pa, pb, timeout_seconds=t)) or bool(verify(pb, pa, timeout_seconds=t))
    except Exception:  # noqa: BLE001 - a parse or verify failure of either answer means: not equivalent
        return False


def is_correct(answer: str | None, reference: str | None, kind: str = "math") -> bool | None:
    """Grade an answer against a reference (None when there is no reference)."""
    if reference is None:
        return None
    if answer is None:
        return False
    if kind == "choice":
        return answer.strip().upper() == reference.strip().upper()
    if kind == "free":
        return (normalize_free(answer) == normalize_free(reference) or normalize(answer) == normalize(reference)
                or equivalent(answer, reference))
    return equivalent(answer, reference)


def same_answer(a: str | None, b: str | None, kind: str = "math") -> bool:
    """Whether two extracted answers fall in one vote class: choices by letter, free text by
    `normalize_free`, math by `equivalent`."""
    if a is None or b is None:
        return False
    if kind == "choice":
        return a.strip().upper() == b.strip().upper()
    if kind == "free":
        numeric = any(c.isdigit() for c in a) and any(c.isdigit() for c in b)
        return normalize_free(a) == normalize_free(b) or (numeric and equivalent(a, b))
    return equivalent(a, b)


@dataclass
class AnswerClass:
    """Answers found equivalent; `representative` is the first seen."""

    representative: str
    members: list[int] = field(default_factory=list)
    weight: float = 0.0
    first_order: float = float("inf")


def cluster_answers(answers: Sequence[str | None], kind: str = "math") -> list[AnswerClass]:
    """Group answers into equivalence classes (None answers are left out), in first-seen order."""
    classes: list[AnswerClass] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for c in classes:
            if same_answer(c.representative, a, kind):
                c.members.append(i)
                break
        else:
            classes.append(AnswerClass(representative=a, members=[i]))
    return classes


@dataclass
class Vote:
    """The record of a vote: the winner and every class with its members and weight."""

    answer: str | None
    winner_members: list[int]
    classes: list[AnswerClass]

    def as_dict(self) -> dict:
        return {
            "answer": self.answer,
            "classes": [
                {"answer": c.representative, "members": c.members, "weight": c.weight} for c in self.classes
            ],
        }


def vote(
    answers: Sequence[str | None],
    weights: Sequence[float] | None = None,
    order: Sequence[float] | None = None,
    kind: str = "math",
) -> Vote:
    """(Weighted) majority vote over equivalence classes; ties go to the earliest finisher (see module doc)."""
    n = len(answers)
    weights = list(weights) if weights is not None else [1.0] * n
    order = list(order) if order is not None else list(range(n))
    if len(weights) != n or len(order) != n:
        raise ValueError("answers, weights and order must have the same length")
    classes = cluster_answers(answers, kind)
    for c in classes:
        c.weight = float(sum(weights[i] for i in c.members))
        c.first_order = min(order[i] for i in c.members)
    if not classes:
        return Vote(answer=None, winner_members=[], classes=[])
    best = min(classes, key=lambda c: (-round(c.weight, 12), c.first_order))
    return Vote(answer=best.representative, winner_members=list(best.members), classes=classes)
