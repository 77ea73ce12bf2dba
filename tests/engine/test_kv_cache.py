"""Acceptance 3 and the block accounting: shared prompts are held once, aborts free blocks next step."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.engine import BlockPool, Engine, ForwardItem, KVCache, SamplingParams, Sequence


def test_64_branches_hold_the_prompt_once_and_abort_frees(tiny_llama):
    _, model = tiny_llama
    bs = 16
    eng = Engine(model, num_blocks=4096, block_size=bs, prefill_chunk=1024)
    prompt = torch.randint(0, 256, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=64, seed=0, detokenize=False)
    eng.add_request("root", prompt, params)
    eng.step()  # prefill + first token
    eng.fork("root", [f"b{i}" for i in range(63)])
    eng.step()  # fork, then one decode step for all 64
    prompt_blocks = 1024 // bs
    running = [r for r in eng.running]
    assert len(running) == 64
    # every branch views the same prompt segment; each owns one tail block
    prompt_seg = running[0].seq.views[0].segment
    assert all(r.seq.views[0].segment is prompt_seg for r in running)
    assert len(prompt_seg.blocks) == prompt_blocks
    assert eng.cache.pool.num_used == 1 + prompt_blocks + 64  # scratch + prompt once + 64 tails
    # the decode step read the prompt segment in ONE job holding all 64 queries
    assert eng.last_decode_jobs[prompt_seg.id] == 64
    used = eng.cache.pool.num_used
    eng.abort("b5")
    assert eng.cache.pool.num_used == used  # not yet: aborts act at the next step
    eng.step()
    assert eng.cache.pool.num_used == used - 1
    assert "b5" not in eng.requests
    for rid in list(eng.requests):
        eng.abort(rid)
    eng.step()
    held = eng.prefix.held_blocks()
    assert eng.cache.pool.num_used == 1 + len(held) == 1 + prompt_blocks
    eng.prefix.clear()
    assert eng.cache.pool.num_used == 1


def test_identical_prompts_share_blocks_through_the_prefix_cache(tiny_llama):
    _, model = tiny_llama
    eng = Engine(model, num_blocks=512, block_size=8)
    prompt = list(range(3, 3 + 100))
    done = []
    for i in range(8):
        eng.add_request(f"r{i}", prompt,
                        SamplingParams(temperature=1.0, top_p=1.0, max_tokens=4, seed=i, detokenize=False),
                        lambda o: done.append(o) if o.finished else None)
    while eng.has_work():
        eng.step()
    assert len(done) == 8
    assert eng.stats["prefill_tokens"] == 100 + 7 * (100 - 96)  # 12 full blocks computed once
    assert sorted(o.cached_tokens for o in done) == [0] + [96] * 7


def test_copy_on_write_copies_only_the_partial_block():
    pool = BlockPool(1, 1, 2, num_blocks=32, block_size=4)
    cache = KVCache(pool)
    seq = Sequence.new(cache)
    seq.write.reserve(10)
    seq.write.length = 10
    before = pool.num_used  # 3 blocks
    kids = seq.fork(3)
    assert pool.num_used == before + 3  # one copied partial block per child
    assert all(k.views[0].segment is seq.views[0].segment for k in kids)  # the 2 full blocks shared
    assert seq.views[0].segment.refs == 4
    for k in kids:
        k.release()
    seq.release()
    assert pool.num_used == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "fork", "drop"]), st.integers(0, 7), st.integers(1, 9)),
                max_size=40))
def test_ref_counts_never_leak(ops):
    """Any interleaving of writes, forks and drops returns every block once all sequences are dropped."""
    pool = BlockPool(1, 1, 2, num_blocks=400, block_size=4)
    cache = KVCache(pool)
    seqs = [Sequence.new(cache)]
    for op, i, n in ops:
        if not seqs:
            seqs.append(Sequence.new(cache))
        s = seqs[i % len(seqs)]
        if op == "grow":
            s.write.reserve(n)
            s.write.length += n
        elif op == "fork":
            seqs += s.fork(n % 3 + 1)
        else:
            s.release()
            seqs.remove(s)
        # every block in use is referenced exactly as often as segments hold it
        holders: dict[int, int] = {}
        segs = {id(v.segment): v.segment for q in seqs for v in q.views}
        for seg in segs.values():
            for b in seg.blocks:
                holders[b] = holders.get(b, 0) + 1
        assert all(pool.refs[b] == c for b, c in holders.items())
        assert pool.num_used == len(holders)
    for s in seqs:
        s.release()
    assert pool.num_used == 0


def test_segment_from_kv_and_views_at_any_offset(tiny_llama):
    """A raw-K/V prefix segment (ParScale hook) viewed at offset 0 with rope_start 0 acts as unrotated
    keys; a view of the prompt placed at a shifted offset gives the same logits as a shifted-position
    forward (RoPE is relative), which is what Hogwild layouts rely on."""
    hf, model = tiny_llama
    cache = KVCache.for_model(model.cfg, num_blocks=64, block_size=4)
    p = list(range(10, 20))
    a = Sequence.new(cache)
    la = model.forward(cache, [ForwardItem(a.views, p, logits="last")])[0]
    # the same segment viewed at offset 50 by another sequence: positions shift, relative distances don't
    b = Sequence.new(cache, prefix=[type(a.views[0])(a.views[0].segment, 50)])
    assert b.views[-1].offset == 60
    lb = model.forward(cache, [ForwardItem(b.views, [7], logits="last")])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([p + [7]]), position_ids=torch.arange(50, 61)[None]).logits[0, -1]
    torch.testing.assert_close(lb[0], ref, atol=1e-4, rtol=1e-4)
    assert la.shape == (1, 256)
    k, _ = cache.read(a.views[0].segment, 0)
    seg = cache.segment_from_kv(torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16))
    assert seg.length == 3 and seg.frozen
    assert k.shape == (10, 2, 16)


def test_segment_embeddings_are_added_before_rope(tiny_llama):
    _, model = tiny_llama
    c = model.cfg
    cache = KVCache.for_model(c, num_blocks=32, block_size=4)
    e = torch.randn(c.num_layers, 2, c.num_kv_heads * c.head_dim)
    p = [5, 6, 7, 8, 9]
    plain = Sequence.new(cache)
    model.forward(cache, [ForwardItem(plain.views, p, logits="none")])
    model.set_segment_embeddings(e, torch.zeros_like(e))
    try:
        tagged = Sequence([type(plain.views[0])(cache.new_segment(embed_id=1), 0)])
        model.forward(cache, [ForwardItem(tagged.views, p, logits="none")])
    finally:
        model.set_segment_embeddings(None)
    k0, _ = cache.read(plain.views[0].segment, 0)
    k1, _ = cache.read(tagged.views[0].segment, 0)
    # RoPE is linear: rope(k + e) - rope(k) = rope(e) at each position
    pos = torch.arange(len(p))
    cos, sin = model._cos_sin(pos)
    er = e[0, 1].view(c.num_kv_heads, c.head_dim).expand(len(p), -1, -1)
    half = c.head_dim // 2
    rot = torch.cat((-er[..., half:], er[..., :half]), -1)
    expect = er * cos[:, None] + rot * sin[:, None]
    torch.testing.assert_close(k1 - k0, expect, atol=1e-5, rtol=1e-5)


def test_two_workers_see_each_other_next_step(tiny_llama):
    """The API.md example: at the first step each worker's logits over [common, other's step, own step]
    equal a plain forward of prompt + own token; A's token is invisible to B in the step it is written
    and visible at the next one."""
    from ttscale.backends.engine import View

    hf, model = tiny_llama
    prompt = [11, 12, 13, 14, 15, 16]

    def run(a_first: int):
        cache = KVCache.for_model(model.cfg, num_blocks=64, block_size=4)
        common = cache.new_segment()
        model.forward(cache, [ForwardItem([View(common, 0)], prompt, logits="none")])
        common.frozen = True
        a, b = cache.new_segment(), cache.new_segment()

        def layout(me, other):
            return [View(common, 0), View(other, common.length), View(me, common.length + other.length)]

        out = []
        for ta, tb in [(a_first, 30), (21, 31)]:
            out.append(model.forward(cache, [ForwardItem(layout(a, b), [ta], write=a),
                                             ForwardItem(layout(b, a), [tb], write=b)]))
        return out

    x, y = run(20), run(99)
    with torch.no_grad():
        ref_a = hf(torch.tensor([prompt + [20]])).logits[0, -1]
        ref_b = hf(torch.tensor([prompt + [30]])).logits[0, -1]
    torch.testing.assert_close(x[0][0][0], ref_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x[0][1][0], ref_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x[0][1], y[0][1])  # B does not see A's token in the same step
    assert (x[1][1] - y[1][1]).abs().max() > 1e-3  # ... and does at the next one


def test_prefix_cache_whole_prompt_and_partial_prefix_are_exact(tiny_llama):
    """Identical block-aligned prompts skip prefill entirely (cached last logits) and view the very same
    segment; a prompt sharing only a prefix reuses its blocks; tokens equal a cache-less engine's."""
    _, model = tiny_llama
    aligned = list(range(3, 3 + 96))  # 12 blocks of 8
    other = aligned[:40] + [7] * 21
    sp = [SamplingParams(temperature=0.8, top_p=1.0, max_tokens=6, seed=i, detokenize=False) for i in range(5)]
    ref = Engine(model, num_blocks=512, block_size=8, prefix_cache=False).generate(
        [aligned] * 4 + [other], sp)
    eng = Engine(model, num_blocks=512, block_size=8)
    reqs = eng.generate([aligned] * 4 + [other], sp)
    assert [r.output_ids for r in reqs] == [r.output_ids for r in ref]
    assert [r.cached_tokens for r in reqs] == [0, 96, 96, 96, 40]
    assert eng.stats["prefill_tokens"] == 96 + (61 - 40)
