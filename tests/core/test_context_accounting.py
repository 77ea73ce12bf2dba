"""Properties of the Context's accounting functions (`ttscale.context_usage`): what a budget leaves a new
branch, when it is spent, and how a child Context's usage folds into its parent's."""

from hypothesis import given
from hypothesis import strategies as st

from ttscale.budget import Budget
from ttscale.context_usage import fold_children, spent_budget, tokens_left
from ttscale.types import Branch, Usage

limits = st.none() | st.integers(1, 10_000)
counts = st.integers(0, 20_000)


@given(limits, limits, limits, st.integers(1, 5_000), counts, counts, counts)
def test_tokens_left_is_at_least_one_and_never_more_than_asked(total, seq, seq_io, max_tokens, generated,
                                                               seq_base, seq_prompt_base):
    budget = Budget(total_tokens=total, sequential_tokens=seq, sequential_io_tokens=seq_io)
    left = tokens_left(budget, max_tokens, generated, seq_base, seq_prompt_base)
    assert 1 <= left <= max_tokens
    if total is not None and total - generated >= 1:
        assert left <= total - generated  # the branch cannot take the total budget past its limit
    if total is None and seq is None and seq_io is None:
        assert left == max_tokens


@given(limits, limits, counts, counts)
def test_a_budget_is_spent_exactly_when_a_count_reaches_it(total, seq, generated, seq_base):
    branch = Branch(id="b0", seq_base=seq_base)
    which = spent_budget(Budget(total_tokens=total, sequential_tokens=seq), lambda: generated, branch)
    over_total = total is not None and generated >= total
    over_seq = seq is not None and branch.seq_end >= seq
    assert (which is not None) == (over_total or over_seq)
    if over_total:
        assert which == "total_tokens"  # checked first, as the Context reports it


@given(st.lists(st.tuples(counts, counts, st.floats(0, 100)), max_size=4), counts, counts,
       st.floats(0, 100))
def test_children_add_tokens_and_share_the_parents_clock_and_critical_path(children, generated, seq, wall):
    parent = Usage(generated_tokens=generated, sequential_tokens=seq, wall_time_s=wall)
    kids = [Usage(generated_tokens=g, sequential_tokens=s, wall_time_s=w) for g, s, w in children]
    total = fold_children(parent, kids)
    assert total.generated_tokens == generated + sum(g for g, _, _ in children)
    assert total.sequential_tokens == max([seq] + [s for _, s, _ in children])
    assert total.wall_time_s == max([wall] + [w for _, _, w in children])
