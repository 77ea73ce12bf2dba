"""Acceptance 2: a seeded branch draws the same tokens whatever else is in the batch; sampler properties."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.sampler import SamplingTensors, sample, uniform


def run(model, batch):
    eng = Engine(model, num_blocks=512, block_size=8)
    return [r.output_ids for r in eng.generate([p for p, _ in batch], [sp for _, sp in batch])]


def test_seeded_branch_independent_of_batch_mates(tiny_llama):
    _, model = tiny_llama
    me = ([1, 2, 3, 4, 5], SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_tokens=30, seed=1234,
                                          detokenize=False))
    alone = run(model, [me])[0]
    mates = [
        ([9] * 40, SamplingParams(temperature=1.3, top_p=1.0, max_tokens=50, seed=7, detokenize=False)),
        ([1, 2, 3, 4, 5], SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_tokens=10, seed=99,
                                         detokenize=False)),
        (list(range(60)), SamplingParams(temperature=0.0, max_tokens=5, detokenize=False)),
    ]
    assert run(model, [mates[0], me, mates[2]])[1] == alone
    assert run(model, mates + [me])[3] == alone
    assert run(model, [me, mates[1]])[1] != alone  # a different seed does draw differently


def _st(rows):
    return SamplingTensors.build(rows, len(rows), "cpu")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31), st.integers(0, 5))
def test_rows_do_not_depend_on_other_rows(n, seed, extra):
    g = torch.Generator().manual_seed(seed % 1000)
    logits = torch.randn(n + extra, 50, generator=g)
    rows = [(1.0, 0.9, 10, seed + i, i) for i in range(n + extra)]
    full = sample(logits, _st(rows), True, 3)[0]
    part = sample(logits[:n].flip(0), _st(rows[:n][::-1]), True, 3)[0].flip(0)
    assert full[:n].tolist() == part.tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 8), st.floats(0.05, 0.5))
def test_top_k_and_top_p_bound_the_support(seed, k, p):
    g = torch.Generator().manual_seed(seed % 997)
    logits = torch.randn(1, 64, generator=g) * 3
    probs = torch.softmax(logits, -1)[0]
    order = probs.argsort(descending=True).tolist()
    for step in range(20):
        tok = sample(logits, _st([(1.0, 1.0, k, seed, step)]), True, 0)[0].item()
        assert tok in order[:k]
        tok = sample(logits, _st([(1.0, p, 0, seed, step)]), True, 0)[0].item()
        cum = probs[order].cumsum(0)
        nucleus = order[: int((cum < p).sum()) + 1]
        assert tok in nucleus


def test_greedy_logprobs_and_top_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    tok, lp, ti, tl = sample(logits, _st([(0.0, 1.0, 0, 0, 0)]), False, 2)
    ref = torch.log_softmax(logits, -1)
    assert tok.item() == 1
    assert torch.allclose(lp, ref[0, 1:2])
    assert ti[0].tolist() == [1, 2] and torch.allclose(tl[0], ref[0, [1, 2]])


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    counts = torch.zeros(3)
    for step in range(3000):
        counts[sample(logits, _st([(1.0, 1.0, 0, 42, step)]), False, 0)[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)


def test_uniform_is_deterministic_and_in_range():
    s = torch.tensor([0, 1, 2**62, -5])
    t = torch.tensor([0, 0, 7, 3])
    u = uniform(s, t)
    assert torch.equal(u, uniform(s, t))
    assert bool(((u > 0) & (u < 1)).all())
    assert len(set(uniform(torch.zeros(1000, dtype=torch.long), torch.arange(1000)).tolist())) > 990


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**40), st.floats(0.0, 1.0, exclude_max=True))
def test_inverse_cdf_matches_a_plain_scan(v, seed, u):
    """The two-level inverse CDF picks the same index as one scan over the row, and never a zero entry."""
    from ttscale.backends.engine.sampler import inverse_cdf

    g = torch.Generator().manual_seed(seed % 10007)
    p = torch.rand(2, v, generator=g, dtype=torch.float64) * (torch.rand(2, v, generator=g) > 0.3)
    p[:, 0] += 1e-3
    got = inverse_cdf(p, torch.tensor([u, 1 - 1e-12], dtype=torch.float64))
    cdf = p.cumsum(-1)
    for r, uu in enumerate([u, 1 - 1e-12]):
        ref = min(int(torch.searchsorted(cdf[r], uu * cdf[r, -1], right=True)), int(p[r].nonzero().max()))
        assert int(got[r]) == ref and p[r, got[r]] > 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2500), st.integers(0, 2**40), st.floats(0.01, 1.0), st.integers(0, 50),
       st.floats(0.0, 1.0, exclude_max=True))
def test_nucleus_pick_matches_mask_and_scan(v, seed, p, k, u):
    """The two-search nucleus pick equals masking the sorted row to its nucleus and scanning it, and never
    lands on a zero-probability entry."""
    from ttscale.backends.engine.sampler import cumsum_rows, nucleus_pick

    g = torch.Generator().manual_seed(seed % 10007)
    probs = torch.rand(1, v, generator=g, dtype=torch.float64) ** 4 * (torch.rand(1, v, generator=g) > 0.2)
    probs[0, 0] += 1e-3
    probs /= probs.sum()
    sp, _ = probs.sort(-1, descending=True)
    uu = torch.tensor([u], dtype=torch.float64)
    got = int(nucleus_pick(sp, cumsum_rows(sp, padded=True), torch.tensor([p]), torch.tensor([k]), uu))
    assert got == int(nucleus_pick(sp, cumsum_rows(sp), torch.tensor([p]), torch.tensor([k]), uu))
    cum = sp[0].cumsum(0)
    keep = ((cum - sp[0]) < p) & ((k <= 0) | (torch.arange(v) < k)) & (sp[0] > 0)
    masked = (sp[0] * keep).cumsum(0)
    ref = min(int(torch.searchsorted(masked, u * masked[-1], right=True)), int(keep.nonzero().max()))
    assert got == ref and sp[0, got] > 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 3000), st.integers(0, 2**40))
def test_packed_sort_orders_each_row_like_a_sort(b, v, seed):
    """The packed flat sort returns every row's values in descending order with their own indices; only
    values within 2**-20 of each other may swap, and they keep vocabulary order."""
    from ttscale.backends.engine.sampler import sort_rows

    g = torch.Generator().manual_seed(seed % 10007)
    logits = torch.randn(b, v, generator=g) * 4
    logits[:, : v // 3] = logits[:, :1]  # exact ties
    probs = torch.softmax(logits, -1)
    sp, si = sort_rows(probs, packed=True)
    ref, _ = probs.sort(-1, descending=True)
    assert torch.equal(torch.gather(probs, 1, si), sp)
    assert torch.equal(si.sort(-1).values, torch.arange(v).expand(b, v))
    assert bool((sp[:, :-1] >= sp[:, 1:] * (1 - 2**-19)).all())
    assert torch.allclose(sp, ref, rtol=2**-19, atol=0)
    tied = (sp[:, :-1] == sp[:, 1:])
    assert bool((si[:, :-1] < si[:, 1:])[tied].all())
