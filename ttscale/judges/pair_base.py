"""The pair-judge interface, the prefixes judges read, and the lexical judge (no model: a floor to beat)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

# Words that mark reasoning moves; DeepPrune's best prefix is "the first 25 reasoning words".
REASONING_WORDS = frozenset({
    "wait", "thus", "since", "so", "but", "therefore", "hence", "however", "alternatively", "because",
    "then", "first", "second", "next", "now", "let", "hmm", "maybe", "actually", "perhaps", "okay", "ok",
    "check", "verify", "suppose", "assume", "consider", "recall", "note", "means", "implies", "finally",
    "compute", "calculate",
})
_WORD = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?|[^\sA-Za-z\d]")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (numbers and punctuation kept as tokens)."""
    return [w.lower() for w in _WORD.findall(text)]


def reasoning_prefix(text: str, n_words: int = 25) -> str | None:
    """The text up to and including its `n_words`-th reasoning word, or None if it has fewer."""
    count = 0
    for m in re.finditer(r"[A-Za-z]+", text):
        if m.group(0).lower() in REASONING_WORDS:
            count += 1
            if count >= n_words:
                return text[: m.end()]
    return None


def judged_prefix(text: str, *, done: bool, num_tokens: int, prefix_words: int = 25,
                  prefix_tokens: int | None = None) -> str | None:
    """What DeepPrune judges of a trace: its prefix once reached, its whole text if it ended earlier, else None.

    The prefix is the text up to the `prefix_words`-th reasoning word, or, with `prefix_tokens` set, the
    first `prefix_tokens` tokens (text cut in proportion to the token count: no detokenizer at hand).
    One function for the live strategy and for the training pairs, so the judge sees the same kind of text.
    """
    if prefix_tokens is not None:
        if num_tokens >= prefix_tokens and num_tokens > 0:
            return text if num_tokens == prefix_tokens else text[: max(1, int(len(text) * prefix_tokens
                                                                               / num_tokens))]
        return text if done else None
    pre = reasoning_prefix(text, prefix_words)
    if pre is not None:
        return pre
    return text if done else None


@runtime_checkable
class PairJudge(Protocol):
    """Probability that two traces with these prefixes end in the same answer."""

    name: str

    def p_same(self, prefix_a: str, prefix_b: str) -> float: ...

    async def ap_same(self, prefix_a: str, prefix_b: str) -> float: ...


class JudgeBase:
    name = "judge"

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        raise NotImplementedError

    async def ap_same(self, prefix_a: str, prefix_b: str) -> float:
        return self.p_same(prefix_a, prefix_b)

    def p_same_many(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return np.array([self.p_same(a, b) for a, b in pairs], dtype=np.float64)


# --------------------------------------------------------------------------- lexical

def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def ngram_overlap(a: str, b: str, max_n: int = 3) -> float:
    """Mean Jaccard similarity of word n-gram sets, n = 1..max_n."""
    ta, tb = words(a), words(b)
    return float(np.mean([jaccard(ngrams(ta, n), ngrams(tb, n)) for n in range(1, max_n + 1)]))


class LexicalJudge(JudgeBase):
    """n-gram overlap as the probability of "same" (uncalibrated; fine for ranking and a threshold)."""

    name = "lexical"

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        return ngram_overlap(prefix_a, prefix_b, self.max_n)

