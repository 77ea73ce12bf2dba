"""The fused Triton decode path equals the torch reference path (CPU: Triton's interpreter; CUDA: real)."""

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels module is imported

from tests.fixtures.engine import make_tiny
from ttscale.backends.engine import ForwardItem, KVCache, Sequence, View
from ttscale.backends.engine.loader import model_from_hf

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("arch,split_keys,skinny", [("llama", 128, False), ("qwen2", 128, False),
                                                    ("qwen3", 128, False), ("llama", 16, False),
                                                    ("qwen2", 128, True), ("llama", 16, True)])
def test_fused_forward_equals_reference(arch, split_keys, skinny, monkeypatch):
    """split_keys=16: jobs are split over key ranges (split-K) and merged like extra views. skinny: the
    projections of few rows through `linear_kernels` (on a GPU it takes 16-bit weights only; here the
    float32 model is let through)."""
    from ttscale.backends.engine import kernels, linear_kernels

    monkeypatch.setattr(kernels, "MIN_SPLIT_KEYS", split_keys)
    if skinny:
        monkeypatch.setattr(linear_kernels, "usable", lambda x: x.shape[0] <= linear_kernels.MAX_ROWS)
    n = 40
    model = model_from_hf(make_tiny(arch), device=DEV, dtype="float32")
    p = [(5 + i) % 256 for i in range(n)]
    outs = {}
    for fused in (False, True):
        assert model.use_kernels(fused) == fused
        cache = KVCache.for_model(model.cfg, num_blocks=256, block_size=16)
        seq = Sequence.new(cache)
        a = model.forward(cache, [ForwardItem(seq.views, p, logits="all")])[0]
        kids = seq.fork(2)
        # three views for one item: shared prompt, a sibling's tail placed after it, its own tail
        extra = [kids[1].views[0], View(kids[1].views[1].segment, n), View(kids[0].views[1].segment, n + 1)]
        for s in extra:
            s.segment.retain()
        b = model.forward(cache, [ForwardItem(s.views, [7 + i, 9], logits="all")
                                  for i, s in enumerate([seq] + kids[1:])]
                          + [ForwardItem(extra, [3], write=kids[0].views[1].segment)])
        outs[fused] = [a] + b
    model.use_kernels(False)
    for x, y in zip(outs[False], outs[True], strict=True):
        torch.testing.assert_close(x, y, atol=2e-3 if DEV == "cuda" else 1e-5, rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_padded_decode_with_uneven_sharing_equals_reference(arch):
    """A padded (CUDA-graph) decode layout where one prompt is shared by many branches and others by few:
    every shared job is padded to the widest one's query count, so most of the few-row jobs' tiles hold
    padding only (they return at once and write nothing). Same logits as the torch path."""
    model = model_from_hf(make_tiny(arch), device=DEV, dtype="float32")
    outs = {}
    for fused in (False, True):
        assert model.use_kernels(fused) == fused
        cache = KVCache.for_model(model.cfg, num_blocks=256, block_size=16)
        common = Sequence.new(cache)
        model.forward(cache, [ForwardItem(common.views, [(3 + i) % 256 for i in range(35)], logits="none")])
        wide = common.fork(40)  # 37 branches stay on the common prompt: its job has 64 query slots
        narrow = []
        for j in range(3):  # three prompts after the common one, two branches each
            base = wide.pop()
            model.forward(cache, [ForwardItem(base.views, [(11 * j + i) % 256 for i in range(20 + 7 * j)],
                                              logits="none")])
            narrow += base.fork(2)
        rows = wide + narrow
        logits = [model.forward(cache, [ForwardItem(s.views, [5 + i]) for i, s in enumerate(rows)], pad=True)
                  for _ in range(3)]
        outs[fused] = [x for step in logits for x in step]
    model.use_kernels(False)
    for x, y in zip(outs[False], outs[True], strict=True):
        torch.testing.assert_close(x, y, atol=2e-3 if DEV == "cuda" else 1e-5, rtol=1e-3)


@pytest.mark.parametrize("b,v", [(1, 5), (3, 1024), (4, 2500)])
def test_fused_cumsum_rows_matches_torch(b, v):
    """The two-launch row scan equals torch's cumsum, and its padded tail repeats the row total."""
    from ttscale.backends.engine import kernels

    x = torch.rand(b, v, device=DEV)
    got = kernels.cumsum_rows(x, chunk=1024)
    assert got.shape == (b, -(-v // 1024) * 1024)
    torch.testing.assert_close(got[:, :v], x.double().cumsum(-1).float(), rtol=1e-5, atol=1e-4)
    assert torch.equal(got[:, v:], got[:, v - 1:v].expand(b, got.shape[1] - v))


@pytest.mark.parametrize("rows", [1, 5, 17, 40, 64])
@pytest.mark.parametrize("bias,gated", [(True, False), (False, False), (False, True)])
def test_skinny_linear_equals_f_linear(rows, bias, gated):
    """The few-row projection equals `F.linear` (+ bias), and gated equals SiLU(gate) * up of the stacked
    weight, for each row bucket (16 / 32 / 64-row tiles, rows past the tile masked) and output widths that
    are not a multiple of the column tile."""
    import torch.nn.functional as F

    from ttscale.backends.engine import kernels, linear_kernels

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32  # the interpreter's tl.dot is float32 only
    n, k = 72, 200
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(DEV, dtype)
    w = (torch.randn(2 * n if gated else n, k, generator=g) / k ** 0.5).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    got = linear_kernels.linear(x, w, b, gated=gated)
    want = F.linear(x, w, b)
    if gated:
        want = kernels.silu_mul(want)
    assert got.shape == (rows, n)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got, want, **tol)


def test_feed_tokens_takes_fed_rows_only():
    """Rows with a source take the fed token at that index; rows without (-1) keep their own; past 128
    rows (a second program)."""
    from ttscale.backends.engine import kernels

    n = 300
    tokens = torch.arange(n, device=DEV) + 1000
    src = torch.tensor([(i * 7) % 50 if i % 3 else -1 for i in range(n)], device=DEV)
    feed = torch.arange(50, device=DEV) * 10
    want = torch.where(src >= 0, feed[src.clamp_min(0)], tokens)
    kernels.feed_tokens(tokens, src, feed)
    assert torch.equal(tokens, want)


def test_launch_configs_fit_the_devices_shared_memory(monkeypatch):
    """The wide tiles measured on an H200 (227 KiB of shared memory a program) are not asked of a GPU with
    less: the few-row kernel pipelines fewer stages, the attention keeps Triton's default tile."""
    from ttscale.backends.engine import kernels, linear_kernels

    launched: list[dict] = []
    monkeypatch.setattr(linear_kernels, "launch", lambda kernel, grid, *a, **kw: launched.append(kw))
    x = torch.zeros(64, 896, dtype=torch.bfloat16)
    w = torch.zeros(2 * 4864, 896, dtype=torch.bfloat16)
    linear_kernels.linear(x, w, gated=True)
    assert launched[-1]["num_stages"] == 4  # 48 KiB a stage: four fit in 227 KiB
    monkeypatch.setattr(linear_kernels, "shared_memory", lambda device: 101376)  # an RTX 4090's 99 KiB
    linear_kernels.linear(x, w, gated=True)
    per_stage = 2 * 128 * (64 + 2 * 64)
    assert launched[-1]["num_stages"] * per_stage <= 0.9 * 101376 and launched[-1]["num_stages"] >= 1

    class Job:  # one job class of 64 queries over 1,024 keys: 64-row tiles
        qidx = torch.zeros(1, 64, dtype=torch.long)
        blocks = torch.zeros(1, 64, dtype=torch.long)
        vslot = delta = limit = qidx

    opts: list[dict] = []
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, *a, **kw: opts.append(kw))
    q, pool = torch.zeros(64, 14, 64, dtype=torch.bfloat16), torch.zeros(8, 16, 2, 64, dtype=torch.bfloat16)
    for smem, wide in ((232448, True), (101376, False)):
        monkeypatch.setattr(kernels, "shared_memory", lambda device, smem=smem: smem)
        kernels.seg_attn(q, pool, pool, Job, torch.zeros(64), None, None, 64, 1, 0.1, 1.0, G=7, split=1,
                         split_max=1)
        assert (opts[-1]["BLOCK_N"] == 128) == wide and ("num_warps" in opts[-1]) == wide
