"""Decode steps launched before the previous step's tokens are read give exactly the outputs of reading
every step at once (`overlap=False`): same tokens, logprobs, top logprobs, finish reasons and lengths,
whatever ends a request (end-of-sequence, stop ids, max_tokens, abort, preemption)."""

from __future__ import annotations

import random

import pytest
import torch

from ttscale.backends.engine import Engine, SamplingParams
from ttscale.backends.engine.request import RequestOutput

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def tiny(request, tiny_llama):
    """The tiny Llama on each device (on CUDA: fused kernels, CUDA graphs, pinned output copies)."""
    hf, model = tiny_llama
    if request.param == "cpu":
        return model
    from ttscale.backends.engine.loader import model_from_hf

    return model_from_hf(hf, device="cuda", dtype="float32")

EOS = [3, 17, 99, 140, 200, 251]  # a few ids of the tiny vocabulary of 256: requests end at varied steps


def _requests(seed: int) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(seed)
    shared = [rng.randrange(5, 256) for _ in range(21)]  # one prompt for several samples (prefix cache)
    out = []
    for i in range(14):
        prompt = shared if i % 3 == 0 else [rng.randrange(5, 256) for _ in range(rng.randrange(1, 40))]
        sp = SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]),
            max_tokens=rng.randrange(1, 40), seed=1000 * seed + i, detokenize=False,
            ignore_eos=i == 5, stop_token_ids=[7, 8] if i % 4 == 1 else [], logprobs=3 if i % 5 == 2 else None,
        )
        out.append((f"r{i}", prompt, sp))
    return out


def _same(a: dict, b: dict) -> bool:
    """Equal outputs: tokens, top-logprob ids and endings exactly; logprobs to float noise (a batch with an
    extra row may sum in another order)."""
    assert a.keys() == b.keys()
    for rid in a:
        (ta, la, pa, fa, ra), (tb, lb, pb, fb, rb) = a[rid], b[rid]
        assert (ta, fa, ra) == (tb, fb, rb), rid
        assert la == pytest.approx(lb, abs=1e-4), rid
        assert [list(d) for d in pa] == [list(d) for d in pb], rid
        assert [v for d in pa for v in d.values()] == pytest.approx([v for d in pb for v in d.values()], abs=1e-4)
    return True


def _run(model, reqs, overlap: bool, abort_after: dict[str, int] | None = None, **engine_kw):
    eng = Engine(model, overlap=overlap, **engine_kw)
    eng.eos = set(EOS)
    eng.scheduler.eos = set(EOS)
    seen: dict[str, list[RequestOutput]] = {}
    abort_after = abort_after or {}

    def cb(o: RequestOutput) -> None:
        outs = seen.setdefault(o.request_id, [])
        outs.append(o)
        if sum(len(x.token_ids) for x in outs) == abort_after.get(o.request_id, -1) and not o.finished:
            eng.abort(o.request_id)  # from the engine thread, as a strategy's cancel does

    for rid, prompt, sp in reqs:
        eng.add_request(rid, prompt, sp, cb)
    while eng.has_work():
        eng.step()
    result = {}
    for rid, outs in seen.items():
        toks = [t for o in outs for t in o.token_ids]
        lps = [lp for o in outs for lp in o.logprobs]
        tops = [d for o in outs for d in (o.top_logprobs or [])]
        result[rid] = (toks, lps, tops, outs[-1].finished, outs[-1].finish_reason)
    assert eng.cache.pool.num_used == 1 + len(eng.prefix.held_blocks())  # every branch's blocks came back
    return result, eng.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_launching_ahead_changes_no_output(tiny, seed):
    model = tiny
    reqs = _requests(seed)
    ahead, st_ahead = _run(model, reqs, overlap=True, num_blocks=256, block_size=8, prefill_chunk=32)
    sync, st_sync = _run(model, reqs, overlap=False, num_blocks=256, block_size=8, prefill_chunk=32)
    assert _same(ahead, sync)
    assert {r[4] for r in sync.values()} >= {"stop", "length"}  # both kinds of ending are exercised
    assert st_ahead["decode_tokens"] == st_sync["decode_tokens"]
    assert st_ahead["launched_ahead"] > 0 and st_sync["launched_ahead"] == 0
    assert st_ahead["dropped_rows"] > 0  # a request that stopped had one more row computed, never emitted


def test_abort_while_a_step_is_in_flight(tiny):
    model = tiny
    reqs = [(rid, p, sp.model_copy(update={"ignore_eos": True, "max_tokens": 30})) for rid, p, sp in _requests(3)]
    abort_after = {"r1": 5, "r4": 2, "r9": 12}
    ahead, _ = _run(model, reqs, overlap=True, abort_after=abort_after, num_blocks=256, block_size=8)
    sync, _ = _run(model, reqs, overlap=False, abort_after=abort_after, num_blocks=256, block_size=8)
    assert _same(ahead, sync)
    for rid, n in abort_after.items():
        assert len(ahead[rid][0]) == n and ahead[rid][4] == "abort"


def test_preemption_with_a_step_in_flight(tiny):
    """Too few KV blocks: planning the next step fails while one is in flight; it is read first, then the
    newest requests are preempted and recomputed, and the outputs stay those of the plain loop."""
    model = tiny
    rng = random.Random(5)
    reqs = [(f"r{i}", [rng.randrange(5, 256) for _ in range(20 + i)],
             SamplingParams(temperature=0.7, max_tokens=40, seed=i, ignore_eos=True, detokenize=False))
            for i in range(4)]
    ahead, st = _run(model, reqs, overlap=True, num_blocks=50, block_size=4, prefix_cache=False)
    sync, _ = _run(model, reqs, overlap=False, num_blocks=50, block_size=4, prefix_cache=False)
    assert st["preemptions"] > 0
    assert _same(ahead, sync)
    assert all(len(v[0]) == 40 for v in ahead.values())


def test_prompts_that_do_not_fit_together_take_turns(tiny):
    """Eight prompts whose prefills do not fit the pool at once are prefilled a few at a time, not failed."""
    reqs = [(f"r{i}", [5 + i] * 9, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, detokenize=False))
            for i in range(8)]
    out, _ = _run(tiny, reqs, overlap=True, num_blocks=20, block_size=4, prefix_cache=False)
    assert all(v[4] == "length" and len(v[0]) == 6 for v in out.values())
    alone, _ = _run(tiny, [(rid, [1] * 90, sp) for rid, _, sp in reqs[:1]], overlap=True, num_blocks=20, block_size=4)
    assert alone["r0"][4] == "error"  # a prompt that cannot fit even alone fails, by name
