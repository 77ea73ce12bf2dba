"""A decode step derived from the previous one (`DecodeLayout.advance`) is the metadata `build_meta` builds
from the views, index for index, across KV block boundaries; where it cannot be (a wider block table,
other rows, segments that changed) it says so and the caller builds anew."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.engine.attn_meta import ForwardItem, Staging, build_meta
from ttscale.backends.engine.kv_cache import BlockPool, KVCache, Sequence

CPU = torch.device("cpu")


def _batch(questions: list[int], samples: int, bs: int) -> tuple[KVCache, list[Sequence]]:
    """`samples` forks of each question's prefilled prompt (lengths `questions`), as the engine holds them."""
    cache = KVCache(BlockPool(1, 1, 2, num_blocks=4000, block_size=bs))
    seqs = []
    for n in questions:
        s = Sequence.new(cache)
        build_meta(cache, [ForwardItem(s.views, list(range(n)))], Staging())
        s.fork(0)  # the prompt's full blocks frozen, as the prefix cache does
        seqs += s.fork(samples) if samples > 1 else [s]
    return cache, seqs


@settings(max_examples=25, deadline=None)
@given(questions=st.lists(st.integers(1, 40), min_size=1, max_size=5), samples=st.integers(1, 4),
       bs=st.sampled_from([2, 4, 16]), pad=st.booleans(), steps=st.integers(1, 40), fed=st.booleans())
def test_advancing_equals_building_anew(questions, samples, bs, pad, steps, fed):
    cache, seqs = _batch(questions, samples, bs)
    staging, R = Staging(), len(seqs)
    src = list(range(R)) if fed else None
    layout, advanced = None, 0
    with torch.inference_mode():
        for step in range(steps):
            tokens = [0] * R if fed else [(7 * step + r) % 50 for r in range(R)]
            meta = layout.advance(tokens, src, staging, CPU) if layout is not None else None
            if meta is None:
                meta = build_meta(cache, [ForwardItem(s.views, [t]) for s, t in zip(seqs, tokens, strict=True)],
                                  staging, pad=pad, src=src, record=True)
                layout = meta.layout
                assert layout is not None
            else:
                advanced += 1
            for s in seqs:  # the same step built from the views
                s.write.length -= 1
            ref = build_meta(cache, [ForwardItem(s.views, [t]) for s, t in zip(seqs, tokens, strict=True)],
                             staging, pad=pad, src=src)
            assert ref.shapes == meta.shapes and torch.equal(ref.flat, meta.flat), step
            assert (ref.n_real, ref.item_rows, ref.jobs_per_segment) == (meta.n_real, meta.item_rows,
                                                                         meta.jobs_per_segment)
    if steps > 2 * bs:
        assert advanced > 0


def test_a_layout_refuses_what_it_cannot_derive():
    cache, seqs = _batch([9, 5], 2, 4)
    staging = Staging()
    with torch.inference_mode():
        meta = build_meta(cache, [ForwardItem(s.views, [1]) for s in seqs], staging, record=True)
        layout = meta.layout
        assert layout is not None
        assert layout.advance([1, 1, 1], None, staging, CPU) is None  # other rows
        assert layout.advance([1] * 4, [0, 1, 2, 3], staging, CPU) is None  # now fed on device: other shapes
        seqs[0].write.length += 1  # a row's segment grew behind its back
        assert layout.advance([1] * 4, None, staging, CPU) is None
        # a view of a segment that is still written (Hogwild-style) is not a decode layout
        other = Sequence.new(cache)
        build_meta(cache, [ForwardItem(other.views, [3, 4])], staging)
        views = [*seqs[1].views[:-1], other.views[-1], seqs[1].views[-1]]
        assert build_meta(cache, [ForwardItem(views, [1])], staging, record=True).layout is None
