"""Answer extraction, equivalence and voting (pure functions)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.answers import (
    cluster_answers,
    equivalent,
    extract_answer,
    extract_boxed,
    is_correct,
    same_answer,
    vote,
)


def test_boxed_nested_braces_takes_last():
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{a^{2}}{b_{1}}}") == r"\frac{a^{2}}{b_{1}}"
    assert extract_boxed(r"unclosed \boxed{\frac{1}{2}") is None
    assert extract_boxed("nothing here") is None


def test_extraction_fallbacks():
    assert extract_answer("work... so the final answer is 42.") == "42"
    assert extract_answer("Answer: $x = 3$") == "x = 3"
    assert extract_answer("no commitment at all") is None
    assert extract_answer(r"The final answer is $\boxed{7}$") == "7"


def test_a_cut_trace_gets_no_answer_from_where_its_text_ends():
    """A trace cut at max_tokens stopped mid-reasoning: its last number (a free text's last line) is where the
    cut fell, not an answer. What it committed to before the cut still counts."""
    mid = "Let x = 12. Then 3x = 36, and subtracting 7 gives 29, so we try"
    assert extract_answer(mid) == "29"  # a trace that ended by itself here: the GSM8K-style fallback
    assert extract_answer(mid, truncated=True) is None
    assert extract_answer(r"so \boxed{29}. Double-checking: 3 * 12 = 36", truncated=True) == "29"
    assert extract_answer("so the final answer is 29.\nChecking: 12 + 17 = 2", truncated=True) == "29"
    assert extract_answer("Rome was\nthe capital, and", "free") == "the capital, and"
    assert extract_answer("Rome was\nthe capital, and", "free", truncated=True) is None
    assert extract_answer("reasoning\nD", "choice", ["a", "b", "c", "d"], truncated=True) == "D"


def test_choice_letters():
    ch = ["a", "b", "c", "d"]
    assert extract_answer(r"... \boxed{C}", "choice", ch) == "C"
    assert extract_answer("so the answer is (B).", "choice", ch) == "B"
    assert extract_answer("reasoning\nD", "choice", ch) == "D"
    assert extract_answer("the answer is (F)", "choice", ch) is None


def test_equivalent_forms_vote_together():
    v = vote([r"\frac{1}{2}", "0.5", "1/2", "3", "3"])
    assert v.answer in (r"\frac{1}{2}", "0.5", "1/2")
    assert sorted(v.winner_members) == [0, 1, 2]
    assert equivalent(r"\frac{1}{2}", "0.5") and equivalent("1/2", "0.5")
    assert not equivalent("1/2", "0.51")
    assert is_correct(r"\dfrac{1}{2}", "0.5") is True
    assert is_correct(None, "1") is False and is_correct("1", None) is None


def test_majority_wins_over_first_finisher():
    v = vote(["7", "8", "8"], order=[0, 1, 2])
    assert v.answer == "8"


def test_tie_goes_to_earliest_finisher():
    # Classes {5} and {9} have one vote each; 9's only member finished first.
    v = vote(["5", "9"], order=[3.0, 1.0])
    assert v.answer == "9"
    v = vote(["5", "9"], order=[1.0, 3.0])
    assert v.answer == "5"


def test_weighted_vote():
    v = vote(["1", "2", "2"], weights=[5.0, 1.0, 1.0])
    assert v.answer == "1"


def test_none_answers_do_not_vote():
    v = vote([None, None, "4"])
    assert v.answer == "4" and v.winner_members == [2]
    assert vote([None, None]).answer is None


answers_st = st.lists(st.sampled_from(["1", "2", "3", "0.5", r"\frac{1}{2}", None]), min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(answers_st, st.randoms())
def test_vote_is_order_invariant_up_to_ties(answers, rnd):
    """Permuting the traces (with their finish order) never changes the winning class."""
    order = list(range(len(answers)))
    v1 = vote(answers, order=order)
    idx = list(range(len(answers)))
    rnd.shuffle(idx)
    v2 = vote([answers[i] for i in idx], order=[order[i] for i in idx])
    if v1.answer is None:
        assert v2.answer is None
    else:
        assert equivalent(v1.answer, v2.answer)


@settings(max_examples=60, deadline=None)
@given(answers_st)
def test_vote_winner_has_max_count(answers):
    v = vote(answers)
    counts = [len(c.members) for c in v.classes]
    if counts:
        assert len(v.winner_members) == max(counts)
    assert sum(counts) == sum(a is not None for a in answers)


@settings(max_examples=40, deadline=None)
@given(answers_st)
def test_clusters_partition_non_none(answers):
    cl = cluster_answers(answers)
    members = sorted(i for c in cl for i in c.members)
    assert members == [i for i, a in enumerate(answers) if a is not None]


@pytest.mark.parametrize("text,reference", [
    ("\\boxed{\\$18}", "18"), ("\\boxed{\\$18.00}", "18"), ("\\boxed{\\text{\\$}18}", "18"),
    ("The answer is \\$18.", "18"), ("The answer is 18 dollars.", "18"), ("The answer is 18 cookies", "18"),
    ("The answer is 3.5 hours", "3.5"), ("The answer is \\[\\frac{1}{2}\\]", "0.5"), ("The answer is \\(7\\)", "7"),
    ("\\boxed{1,000}", "1000"), ("The answer is $5x$", "5x"), ("\\boxed{2\\pi}", "2\\pi"),
])
def test_money_units_and_display_math_grade_as_the_number(text, reference):
    assert is_correct(extract_answer(text), reference)


@pytest.mark.parametrize("answer,reference", [
    ("5x", "5"), ("2\\pi", "2"), ("18 dollars", "19"), ("5 x", "5"), ("\\$18", "1.8"), ("3 and 4", "3"),
])
def test_what_is_not_dressing_still_counts(answer, reference):
    assert not is_correct(answer, reference)


@given(st.integers(-10**6, 10**6), st.sampled_from(["dollars", "eggs", "cookies", "km", "hours", "USD"]))
def test_a_number_with_its_unit_or_currency_votes_with_the_number(n, unit):
    assert same_answer(f"{n} {unit}", str(n)) and same_answer(f"\\${n}", str(n))
    assert not same_answer(f"{n} {unit}", str(n + 1))


def test_math_verifys_timeout_notice_is_silenced_for_our_untimed_calls_only(monkeypatch, caplog):
    """Off the main thread we call math-verify without a time limit on purpose (its limit is SIGALRM): its
    once-per-process "Timeout is disabled" warning is dropped there, and only there; its other warnings pass."""
    import logging
    import threading

    import math_verify.grader
    import math_verify.parser
    from math_verify import parse

    from ttscale.answers import _untimed

    def notices() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("Timeout is disabled")]

    caplog.set_level(logging.WARNING)
    for module in (math_verify.parser, math_verify.grader):
        monkeypatch.setattr(module, "TIMEOUT_WARNING_SHOWN", False)
    got: list[bool] = []
    worker = threading.Thread(target=lambda: got.append(equivalent(r"\frac{13}{17}", "13/17")))
    worker.start()
    worker.join()
    assert got == [True] and notices() == []
    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)
    parse("$1$", parsing_timeout=None)  # someone else's untimed call: warned as math-verify does
    assert len(notices()) == 1
    with _untimed(True):
        logging.getLogger("math_verify.parser").warning("Timeout during parsing: x")
    assert any(r.getMessage() == "Timeout during parsing: x" for r in caplog.records)
