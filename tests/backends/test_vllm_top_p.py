"""The head-first top-k / top-p filter for vLLM's CPU sampler keeps what vLLM's sort-based filter keeps.

Pure-torch properties here; against vLLM's own function where vLLM is importable; and in the real
in-process engine (the session's tiny model) seeded requests draw the same tokens with either filter."""

from __future__ import annotations

import importlib.util
import uuid

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ttscale.backends.vllm_top_p import head_first_top_k_top_p, sorted_top_k_top_p

HAS_VLLM = importlib.util.find_spec("vllm") is not None
EDGE = 1e-5  # a token whose mass above lies this close to p is on the edge: float rounding may decide it


def _case(seed: int, rows: int, vocab: int, scale: float, ties: bool, with_k: bool):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    if ties:
        logits = logits.round()  # many equal logits, at the top-k and top-p edges too (as bfloat16 gives)
    p = torch.rand(rows, generator=g) * 0.98 + 0.01
    p[torch.rand(rows, generator=g) < 0.25] = 1.0
    k = None
    if with_k:
        k = torch.randint(1, vocab + 1, (rows,), generator=g, dtype=torch.int32)
        k[torch.rand(rows, generator=g) < 0.3] = vocab  # no top-k on that row, as vLLM writes it
    return logits, k, p


def _ambiguous(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """Rows where the two filters may rightly differ: a token's mass above lies within EDGE of p (sums of
    the same numbers in another order round differently), or at top-p 1 a probability near float32's
    underflow (which tokens have none)."""
    out = torch.zeros(logits.shape[0], dtype=torch.bool)
    for r in range(logits.shape[0]):
        row = logits[r].double().clone()
        if k is not None and 0 < int(k[r]) < row.numel():
            row[row < row.topk(int(k[r])).values[-1]] = -float("inf")
        probs = row.sort(descending=True).values.softmax(-1)
        above = probs.cumsum(-1) - probs
        if float(p[r]) >= 1:
            out[r] = bool(((probs > 0) & (probs < 1e-30)).any())
        else:
            out[r] = bool(((above - float(p[r])).abs() < EDGE).any())
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), vocab=st.integers(2, 400),
       scale=st.sampled_from([0.3, 1.0, 3.0, 8.0, 30.0]), ties=st.booleans(), with_k=st.booleans(),
       heads=st.sampled_from([(1,), (2, 8), (4, 64), (64, 1024)]))
@example(seed=0, rows=3, vocab=400, scale=0.3, ties=False, with_k=False, heads=(2, 8))  # wide nuclei: all sorted
@example(seed=1, rows=4, vocab=50, scale=30.0, ties=True, with_k=True, heads=(1,))
def test_keeps_what_the_sorting_filter_keeps(seed, rows, vocab, scale, ties, with_k, heads):
    logits, k, p = _case(seed, rows, vocab, scale, ties, with_k)
    want = sorted_top_k_top_p(logits.clone(), None if k is None else k.clone(), p.clone())
    got = head_first_top_k_top_p(logits.clone(), k, p, heads=heads)
    clear = ~_ambiguous(logits, k, p)
    assert torch.equal(torch.isinf(got)[clear], torch.isinf(want)[clear])
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept])  # kept logits unchanged
    assert (kept & (logits == logits.amax(-1, keepdim=True))).any(-1).all()  # a most likely token always
    low_kept = torch.where(kept, logits, torch.inf).amin(-1)
    high_masked = torch.where(kept, -torch.inf, logits).amax(-1)
    assert (low_kept >= high_masked).all()  # a top set: nothing masked outranks anything kept (ties may split)


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 4), vocab=st.integers(2, 200), with_k=st.booleans())
@settings(max_examples=50, deadline=None)
def test_without_top_p_it_is_the_full_filter(seed, rows, vocab, with_k):
    logits, k, _ = _case(seed, rows, vocab, 3.0, False, with_k)
    want = sorted_top_k_top_p(logits.clone(), k, None)
    assert torch.equal(head_first_top_k_top_p(logits.clone(), k, None), want)


def test_kept_mass_reaches_p_and_no_smaller_top_set_does():
    logits, _, _ = _case(7, 64, 5000, 4.0, False, False)
    p = torch.linspace(0.05, 0.99, 64)
    got = head_first_top_k_top_p(logits.clone(), None, p)
    probs = logits.double().softmax(-1)
    kept_mass = (probs * ~torch.isinf(got)).sum(-1)
    smallest_kept = torch.where(torch.isinf(got), torch.inf, probs).amin(-1)
    assert (kept_mass >= p.double() - 1e-9).all()
    assert (kept_mass - smallest_kept < p.double()).all()


def test_a_row_whose_nucleus_is_wider_than_every_head_is_sorted_whole():
    calls = []

    def full(logits, k, p):
        calls.append(logits.shape[0])
        return sorted_top_k_top_p(logits, k, p)

    peaky = torch.tensor([[10.0] + [0.0] * 99])
    flat = torch.arange(100.0)[None] * 1e-3  # nearly uniform, no ties: ~90 tokens in the nucleus
    logits = torch.cat([peaky, flat])
    p = torch.tensor([0.9, 0.9])
    got = head_first_top_k_top_p(logits.clone(), None, p, heads=(4, 16), full=full)
    assert calls == [1]  # the flat row only
    assert torch.equal(got, sorted_top_k_top_p(logits.clone(), None, p))
    assert int((~torch.isinf(got[0])).sum()) == 1 and 85 < int((~torch.isinf(got[1])).sum()) < 95


def test_a_tie_across_the_edge_is_left_to_the_full_filter():
    """Which of several equal logits vLLM keeps depends on its sort; the head-first filter does not guess."""
    calls = []

    def full(logits, k, p):
        calls.append(logits.shape[0])
        return sorted_top_k_top_p(logits, k, p)

    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0] + [0.0] * 60, [5.0, 3.0, 2.0, 1.0] + [0.0] * 60])
    p = torch.tensor([0.6, 0.6])  # row 0: 5.0 and one of the three 3.0s; row 1: 5.0 alone
    got = head_first_top_k_top_p(logits.clone(), None, p, heads=(8,), full=full)
    assert calls == [1]
    assert torch.equal(got, sorted_top_k_top_p(logits.clone(), None, p))
    assert [int((~torch.isinf(r)).sum()) for r in got] == [2, 1]


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), vocab=st.integers(2, 300), ties=st.booleans(),
       with_k=st.booleans(), with_p=st.booleans())
@settings(max_examples=60, deadline=None)
def test_the_reference_is_vllms_own_filter(seed, rows, vocab, ties, with_k, with_p):
    """`sorted_top_k_top_p` is what the installed vLLM does (a vLLM upgrade that changes it fails here)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    logits, k, p = _case(seed, rows, vocab, 3.0, ties, with_k)
    p = p if with_p else None
    want = apply_top_k_top_p_pytorch(logits.clone(), None if k is None else k.clone(),
                                     None if p is None else p.clone(), allow_cpu_sync=True)
    got = sorted_top_k_top_p(logits.clone(), k, p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.vllm
async def test_the_in_process_engine_draws_the_same_tokens_with_either_filter(vllm_backend, monkeypatch):
    """Seeded requests one at a time (so the batch is the same) on the real engine: the head-first filter is
    what ran, and vLLM's own filter put back draws the same tokens."""
    from vllm.v1.sample.ops import topk_topp_sampler as sampler_ops

    import ttscale.backends.vllm_top_p as top_p_mod
    from ttscale.types import GenerationRequest, SamplingSpec

    assert sampler_ops.apply_top_k_top_p.__module__ == top_p_mod.__name__  # installed by the backend's start
    ran = []
    head_first = top_p_mod.head_first_top_k_top_p
    monkeypatch.setattr(top_p_mod, "head_first_top_k_top_p", lambda *a, **kw: ran.append(1) or head_first(*a, **kw))

    async def draw() -> list[list[int]]:
        out = []
        for i, (temperature, top_p, top_k) in enumerate([(0.05, 0.9, 0), (0.3, 0.8, 20), (1.0, 0.95, 0)]):
            sampling = SamplingSpec(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=12, seed=40 + i)
            req = GenerationRequest(request_id=f"tp-{uuid.uuid4().hex[:8]}", sampling=sampling,
                                    prompt_token_ids=[(3001 + 37 * i + 11 * j) % 40000 + 100 for j in range(9)])
            out.append([t async for d in vllm_backend.generate(req) for t in d.token_ids])
        return out

    head_first_tokens = await draw()
    assert ran, "the head-first filter did not run"
    monkeypatch.setattr(sampler_ops, "apply_top_k_top_p", sampler_ops.apply_top_k_top_p.vllm_filter)
    assert head_first_tokens == await draw()
    assert all(len(t) == 12 for t in head_first_tokens)
