"""Acceptance 1: greedy tokens equal transformers `generate` on the same weights (tiny random models)."""

import pytest
import torch

from ttscale.backends.engine import Engine, ForwardItem, KVCache, SamplingParams, Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, detokenize=False)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_single_prompt(tiny_pair):
    hf, model = tiny_pair
    (p,) = prompts([11])
    eng = Engine(model, num_blocks=128, block_size=8)
    (r,) = eng.generate([p], GREEDY)
    assert r.output_ids == hf_greedy(hf, p, 24)
    assert r.finish_reason == "length"


def test_batch_of_different_lengths_with_chunked_prefill(tiny_pair):
    hf, model = tiny_pair
    ps = prompts([3, 40, 17, 64], seed=1)
    eng = Engine(model, num_blocks=256, block_size=8, prefill_chunk=24)  # prompts split across steps
    reqs = eng.generate(ps, GREEDY)
    for p, r in zip(ps, reqs, strict=True):
        assert r.output_ids == hf_greedy(hf, p, 24)


def test_fork_mid_sequence(tiny_pair):
    """Fork after 7 generated tokens; each child (and the parent) continues exactly like generate. The fork
    takes the parent as it is after its last launched step: the step launched while its 7th token was read
    may add an 8th first."""
    hf, model = tiny_pair
    (p,) = prompts([13], seed=2)
    eng = Engine(model, num_blocks=128, block_size=4)
    outs: dict[str, list[int]] = {}
    eng.add_request("p", p, SamplingParams(temperature=0.0, max_tokens=20, detokenize=False),
                    lambda o: outs.setdefault(o.request_id, []).extend(o.token_ids))
    while len(outs.get("p", [])) < 7:
        eng.step()
    eng.fork("p", ["c1", "c2"], [lambda o: outs.setdefault(o.request_id, []).extend(o.token_ids)] * 2)
    while eng.has_work():
        eng.step()
    ref = hf_greedy(hf, p, 20)
    assert outs["p"] == ref
    for c in ("c1", "c2"):
        k = len(ref) - len(outs[c])  # tokens the child inherited
        assert k in (7, 8) and outs["p"][:k] + outs[c] == ref
    cached = eng.prefix.held_blocks()
    assert eng.cache.pool.num_used == 1 + len(cached)  # the padding block + the prompt kept for reuse


@pytest.mark.parametrize("split", [5, 8, 11])
def test_fork_then_different_tokens_low_level(tiny_pair, split):
    """Children of a fork fed different tokens see the shared prefix and only their own tail
    (copy-on-write of the partial block): logits equal a plain forward of each full token list."""
    hf, model = tiny_pair
    (p,) = prompts([split], seed=3)
    cache = KVCache.for_model(model.cfg, num_blocks=64, block_size=4)
    seq = Sequence.new(cache)
    model.forward(cache, [ForwardItem(seq.views, p, logits="none")])
    kids = seq.fork(2)
    tails = {0: [7, 8, 9], 1: [100], 2: [42, 43]}
    seqs = [seq] + kids
    got = model.forward(cache, [ForwardItem(s.views, tails[i], logits="all") for i, s in enumerate(seqs)])
    for i in range(3):
        with torch.no_grad():
            ref = hf(torch.tensor([p + tails[i]])).logits[0, split:]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=1e-4)


def test_preemption_recomputes_and_stays_exact(tiny_llama):
    """With too few KV blocks for every branch, the newest branches are preempted (KV freed) and later
    recomputed from prompt + tokens so far: outputs equal an engine that had room for all."""
    _, model = tiny_llama
    ps = prompts([20, 21, 22, 23], seed=5)
    sp = [SamplingParams(temperature=0.7, top_p=1.0, max_tokens=40, seed=i, detokenize=False) for i in range(4)]
    roomy = Engine(model, num_blocks=256, block_size=4, prefix_cache=False).generate(ps, sp)
    tight = Engine(model, num_blocks=50, block_size=4, prefix_cache=False)
    got = tight.generate(ps, sp)
    assert tight.stats["preemptions"] > 0
    assert [r.output_ids for r in got] == [r.output_ids for r in roomy]
    assert all(r.finish_reason == "length" for r in got)


def test_a_full_pool_takes_back_partial_prefills_before_ending_a_branch():
    """Long prompts prefilled in chunks held their blocks while waiting; the running branches, preempted
    down to the last one, could not grow, and that one was ended with an error (5 of 8 branches of a
    long-reasoning run). Partial prefills now give their blocks back first: every branch completes, with
    the tokens of an engine that had room for all."""
    from tests.fixtures.engine import make_tiny
    from ttscale.backends.engine.loader import model_from_hf

    model = model_from_hf(make_tiny("llama", seed=1, max_position_embeddings=2048))
    ps = [[(7 * j + i) % 250 + 3 for j in range(700)] for i in range(3)]
    sp = [SamplingParams(temperature=0.6, top_p=0.95, max_tokens=400, seed=i, ignore_eos=True, detokenize=False)
          for i in range(3)]
    roomy = Engine(model, num_blocks=400, block_size=16).generate(ps, sp)
    tight = Engine(model, num_blocks=80, block_size=16)  # one branch's prompt + output is 69 blocks
    got = tight.generate(ps, sp)
    assert tight.stats["prefills_released"] > 0
    assert [r.finish_reason for r in got] == ["length"] * 3, [r.error for r in got]
    assert [r.output_ids for r in got] == [r.output_ids for r in roomy]
