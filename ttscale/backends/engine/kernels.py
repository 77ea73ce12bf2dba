"""Triton kernels for the decode path on CUDA: fewer, fused launches per layer.

A decode step of a small model is launch-bound: the eager torch forward issues ~100 tiny kernels per
layer. These fuse them to about ten per layer (residual add + RMSNorm; RoPE + K/V write into the pool;
segment attention with the query rotated per view, writing partial output + log-sum-exp; the exact
merge of partials; SiLU * up), plus the sampler's row-wise cumulative sum. Same semantics as
`Model.forward_meta`'s torch path, which stays the reference (tests compare them, on CPU through Triton's
interpreter).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ttscale.backends.engine.precompile import compiling, launch

LOG2E = 1.4426950408889634
NEG = -1.0e30


@triton.jit
def _add_rmsnorm(X, R, W, Y, n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(R + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(X + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    xn = (xf * tl.rsqrt(var + eps)).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * n_cols + cols, w * xn, mask=mask)


@triton.jit
def _rope_write(K, V, sk, sv, KP, VP, SLOTS, POS, INV_FREQ, rope_scale,
                HKV: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half: tl.constexpr = D // 2
    c = tl.arange(0, D)
    kb = K + t * sk + h * D
    k = tl.load(kb + c).to(tl.float32)
    k2 = tl.load(kb + (c + half) % D).to(tl.float32)
    sign = tl.where(c < half, -1.0, 1.0)
    ang = tl.load(POS + t).to(tl.float32) * tl.load(INV_FREQ + c % half)
    kr = (k * tl.cos(ang) + sign * k2 * tl.sin(ang)) * rope_scale
    slot = tl.load(SLOTS + t).to(tl.int64)
    dst = slot * (HKV * D) + h * D + c
    tl.store(KP + dst, kr.to(KP.dtype.element_ty))
    tl.store(VP + dst, tl.load(V + t * sv + h * D + c).to(VP.dtype.element_ty))


# Shape numbers that change as a batch grows, shrinks or lengthens are plain arguments, not specialised
# on: each specialisation is one more compile (about a second) on a process's first steps.
@triton.jit(do_not_specialize=["n_rows", "Qc", "MB", "V", "SPLIT", "SPLIT_MAX"])
def _seg_attn(Q, sq, KP, VP, QIDX, VSLOT, DELTA, LIMIT, BLOCKS, INV_FREQ, OUT, LSE,
              n_rows, Qc, MB, sm_scale, rope_scale, V, SPLIT, SPLIT_MAX,
              H: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
              BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    pid2 = tl.program_id(2)
    mt = pid2 // SPLIT
    split = pid2 % SPLIT
    f = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = f // G
    g = f % G
    valid = qi < Qc
    jq = j * Qc + qi
    row = tl.load(QIDX + jq, mask=valid, other=n_rows).to(tl.int64)
    vs = tl.load(VSLOT + jq, mask=valid, other=0).to(tl.int64)
    dlt = tl.load(DELTA + jq, mask=valid, other=0).to(tl.float32)
    lim = tl.load(LIMIT + jq, mask=valid, other=0).to(tl.int32)
    lim_all = tl.max(lim, 0)
    if lim_all == 0:  # a tile of padding only (a job padded to its class's query count): nothing to do
        return
    head = kvh * G + g
    half: tl.constexpr = D // 2
    c = tl.arange(0, D)
    qmask = (valid & (row < n_rows))[:, None]
    qp = Q + row[:, None] * sq + head[:, None] * D
    q = tl.load(qp + c[None, :], mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(qp + ((c + half) % D)[None, :], mask=qmask, other=0.0).to(tl.float32)
    ang = dlt[:, None] * tl.load(INV_FREQ + c % half)[None, :]
    sign = tl.where(c < half, -1.0, 1.0)[None, :]
    q = (q * tl.cos(ang) + sign * q2 * tl.sin(ang)) * (rope_scale * sm_scale * 1.4426950408889634)
    q = q.to(KP.dtype.element_ty)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    chunk = tl.cdiv(tl.cdiv(lim_all, SPLIT), BLOCK_N) * BLOCK_N
    k_lo = split * chunk
    lim_max = tl.minimum(lim_all, k_lo + chunk)
    offs = tl.arange(0, BLOCK_N)
    for start in range(k_lo, lim_max, BLOCK_N):
        t = start + offs
        tm = t < lim_max
        blk = tl.load(BLOCKS + j * MB + t // BS, mask=tm, other=0).to(tl.int64)
        ks = blk * BS + t % BS
        kp = ks[:, None] * (HKV * D) + kvh * D + c[None, :]
        k = tl.load(KP + kp, mask=tm[:, None], other=0.0)
        if IEEE:  # noqa: SIM108 - Triton JIT source: a statement-level branch on a constexpr
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(t[None, :] < lim[:, None], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VP + kp, mask=tm[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    smask = valid & (row < n_rows)  # padded query rows are not read: no stores to the dummy row
    ob = (row * (V * SPLIT_MAX) + vs * SPLIT_MAX + split) * H + head
    tl.store(OUT + ob[:, None] * D + c[None, :], o, mask=smask[:, None])
    tl.store(LSE + ob, lse, mask=smask)


@triton.jit(do_not_specialize=["n_slots"])
def _merge(OUT, LSE, Y, n_slots, H: tl.constexpr, D: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per (row, head): combine the row's partial outputs over its view/split slots, BLOCK_V
    slots at a time with a running max, so the cost does not grow with an unrolled view count."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    c = tl.arange(0, D)
    vs = tl.arange(0, BLOCK_V)
    mx = tl.max(tl.full([BLOCK_V], -3.0e38, tl.float32), 0)
    den = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    acc = tl.zeros([D], tl.float32)
    for v0 in range(0, n_slots, BLOCK_V):
        v = v0 + vs
        vm = v < n_slots
        lse = tl.load(LSE + (r * n_slots + v) * H + h, mask=vm, other=-3.0e38)
        m_new = tl.maximum(mx, tl.max(lse, 0))
        alpha = tl.exp(mx - m_new)
        w = tl.exp(lse - m_new)
        # a slot no job wrote holds lse = -1e30 and whatever its memory held (not zeroed): not read
        o = tl.load(OUT + ((r * n_slots + v) * H + h)[:, None] * D + c[None, :],
                    mask=(vm & (lse > -1.0e29))[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        den = den * alpha + tl.sum(w, 0)
        mx = m_new
    tl.store(Y + (r * H + h) * D + c, (acc / den).to(Y.dtype.element_ty))


@triton.jit
def _chunk_sums(X, S, V, C, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    i = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + b * V + i, mask=i < V, other=0.0)
    tl.store(S + b * C + c, tl.sum(x, 0))


@triton.jit
def _chunk_scan(X, S, Y, V, C, CHUNK: tl.constexpr, C_POW2: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    k = tl.arange(0, C_POW2)
    before = tl.sum(tl.load(S + b * C + k, mask=k < c, other=0.0), 0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + b * V + i, mask=i < V, other=0.0)
    tl.store(Y + b * (C * CHUNK) + i, tl.cumsum(x, 0) + before)


@triton.jit
def _silu_mul(GU, Y, n_inter, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n_inter
    g = tl.load(GU + r * 2 * n_inter + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + r * 2 * n_inter + n_inter + c, mask=m, other=0.0)
    y = (g / (1.0 + tl.exp(-g))).to(u.dtype) * u
    tl.store(Y + r * n_inter + c, y, mask=m)


@triton.jit(do_not_specialize=["n"])
def _feed_tokens(TOK, SRC, FEED, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    src = tl.load(SRC + i, mask=m, other=-1)
    fed = tl.load(FEED + tl.maximum(src, 0), mask=m & (src >= 0), other=0)
    tl.store(TOK + i, fed, mask=m & (src >= 0))


# ---- launchers ----------------------------------------------------------------------------------------


def add_rmsnorm(x, res, w, eps: float):
    """y = rmsnorm(x + res) * w; x is updated in place to x + res when `res` is given."""
    n, d = x.shape
    y = x.new_empty(n, d)
    launch(_add_rmsnorm, (n,), x, res if res is not None else x, w, y, d, eps, HAS_RES=res is not None,
           BLOCK=triton.next_power_of_2(d))
    return y


def feed_tokens(tokens: torch.Tensor, src: torch.Tensor, feed: torch.Tensor) -> None:
    """`tokens[i] = feed[src[i]]` where `src[i] >= 0` (a decode step's inputs sampled by the step before,
    still on the device): one launch for what is five in torch."""
    n = tokens.shape[0]
    launch(_feed_tokens, (triton.cdiv(n, 128),), tokens, src, feed, n, BLOCK=128)


def rope_write(k, v, kpool, vpool, slots, pos, inv_freq, rope_scale: float) -> None:
    n, hkv, d = k.shape
    launch(_rope_write, (n, hkv), k, v, k.stride(0), v.stride(0), kpool, vpool, slots, pos, inv_freq,
           rope_scale, HKV=hkv, D=d)


TUNE: dict = {"num_warps": None, "num_stages": None}
WIDE_MAX_WAVES = 4  # a launch of more programs than this many per SM takes the narrow tile (NARROW)
NARROW = (64, 4, 2)  # key tile, warps, pipeline stages
MIN_SPLIT_KEYS = 128  # fewest keys one split of a job handles


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _cuda_properties(device: torch.device):
    """`device`'s CUDA properties, None where there is no CUDA device (the interpreter, or compiling for an
    sm_90 target without one: the callers then answer for an H100/H200)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (an H100/H200's 132 where there is no CUDA device)."""
    props = _cuda_properties(device)
    return 132 if props is None else int(props.multi_processor_count)


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (an H100/H200's 227 KiB where there is no CUDA
    device)."""
    props = _cuda_properties(device)
    if props is None:
        return 232448
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def _launch_opts(num_warps, num_stages) -> dict:
    out = {}
    if num_warps is not None:
        out["num_warps"] = num_warps
    if num_stages is not None:
        out["num_stages"] = num_stages
    return out


def attn_split(cm, G: int, hkv: int, bs: int) -> int:
    """Key-range splits for one job class: enough programs to fill the GPU when jobs are few and long."""
    J, Qc = cm.qidx.shape
    rows = Qc * G
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    programs = J * hkv * -(-rows // block_m)
    keys = cm.blocks.shape[1] * bs
    split = 1
    while split < 16 and programs * split * 2 <= 512 and keys // (split * 2) >= MIN_SPLIT_KEYS:
        split *= 2
    return split


def seg_attn(q, kpool, vpool, cm, inv_freq, out, lse, n_rows: int, vmax: int, sm_scale: float,
             rope_scale: float, G: int, split: int, split_max: int, block_n: int = 64,
             num_warps: int | None = None, num_stages: int | None = None) -> None:
    """Partial attention of one job class into `out [n_rows+1, V*split_max, H, D]` and `lse`, one slot
    per (view, key split)."""
    J, Qc = cm.qidx.shape
    _, H, D = q.shape
    hkv = H // G
    bs = kpool.shape[1]
    rows = Qc * G
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    grid = (J, hkv, triton.cdiv(rows, block_m) * split)
    wide = (128, 8, 2) if block_m <= 32 else (128, 8, 3)
    tile_bytes = kpool.element_size() * D * (block_m + 2 * wide[0] * wide[2])  # Q tile + K/V tiles per stage
    many = J * hkv * grid[2] > WIDE_MAX_WAVES * sm_count(q.device)
    if num_warps is None and TUNE["num_warps"] is None and many:
        # hundreds of branches a step: one program per branch's own tail, each a few key tiles long. The wide
        # tile's shared memory let two programs share an SM and left the GPU waiting on their loads (a
        # 512-branch step of the SmolLM2 shape: ~100 us a layer); small tiles keep more programs resident.
        block_n, num_warps, num_stages = NARROW
    elif num_warps is None and TUNE["num_warps"] is None and tile_bytes <= 0.9 * shared_memory(q.device):
        # measured on an H200 (benchmarks/engine_profile.py --tune, benchmarks/attn_sweep.py): jobs of up to 32
        # query rows like wide key tiles (W=4 Hogwild step: 7.2 -> 5.5 us per layer); 64-row tiles (a segment
        # many queries share) 8.6 against 11.8 us with Triton's default (64 wide, 4 warps, 3 stages) for 64
        # branches over a 1,024-token prompt. A GPU with less shared memory keeps Triton's default.
        block_n, num_warps, num_stages = wide
    configs = [(block_n, num_warps, num_stages)]
    if compiling() and not many and TUNE["num_warps"] is None:  # compile ahead what a wider batch picks too
        configs.append(NARROW)
    for bn, nw, ns in configs:
        launch(_seg_attn, grid, q, q.stride(0), kpool, vpool, cm.qidx, cm.vslot, cm.delta, cm.limit, cm.blocks,
               inv_freq, out, lse, n_rows, Qc, cm.blocks.shape[1], sm_scale, rope_scale, vmax, split, split_max,
               H=H, G=G, HKV=hkv, D=D, BS=bs, BLOCK_M=block_m, BLOCK_N=bn,
               IEEE=kpool.dtype == torch.float32, **_launch_opts(
                   nw if nw is not None else TUNE["num_warps"], ns if ns is not None else TUNE["num_stages"]))


def merge(out, lse, y, vmax: int, block_v: int = 16) -> None:
    """Combine `vmax` partial slots per (row, head), `block_v` slots a pass (one compile whatever `vmax` is)."""
    n = y.shape[0]
    _, _, H, D = out.shape
    launch(_merge, (n, H), out, lse, y, vmax, H=H, D=D, BLOCK_V=block_v)


def cumsum_rows(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Row-wise cumulative sum of float32 `[B, V]` into `[B, ceil(V / chunk) * chunk]` (the tail repeats
    the row total): chunk sums, then each chunk's scan plus the sum of the chunks before it. Two launches
    whatever B is; torch's scan of long rows grew with the batch."""
    B, V = x.shape
    C = triton.cdiv(V, chunk)
    x = x.contiguous()
    sums = torch.empty(B, C, dtype=torch.float32, device=x.device)
    out = torch.empty(B, C * chunk, dtype=torch.float32, device=x.device)
    launch(_chunk_sums, (B, C), x, sums, V, C, CHUNK=chunk)
    launch(_chunk_scan, (B, C), x, sums, out, V, C, CHUNK=chunk, C_POW2=triton.next_power_of_2(C))
    return out


def silu_mul(gu):
    n, two_i = gu.shape
    inter = two_i // 2
    y = gu.new_empty(n, inter)
    launch(_silu_mul, (n, triton.cdiv(inter, 1024)), gu, y, inter, BLOCK=1024)
    return y
