"""Linear layers of few rows (a decode step of up to 64 branches) as Triton kernels.

At 1-64 rows a projection of a small model is a weight read of 1-17 MB, which cuBLAS runs as a latency-bound
kernel (4-8 us for 1.6-17 MB on an H200, a split-K reduction kernel after the down projection) far from the
memory roofline. These read the weight once in tiles of `block_n` output columns, many programs wide, with
the bias and, for the MLP's gate/up projection, SiLU(gate) * up in the epilogue (one launch instead of two).
Larger row counts (prefill, hundreds of branches) stay with cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttscale.backends.engine.kernels import shared_memory
from ttscale.backends.engine.precompile import launch

MAX_ROWS = 64  # beyond this cuBLAS's tensor-core tiles win


@triton.jit(do_not_specialize=["M"])
def _skinny_linear(X, W, B, Y, M, sx, N: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr):
    """Y[M, N] = X[M, K] @ W[N, K]^T (+ B); GATED: W holds [gate; up] (2N rows) and Y = silu(gate) * up."""
    pn = tl.program_id(0)
    pm = tl.program_id(1)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M
    nm = rn < N
    xp = X + rm.to(tl.int64)[:, None] * sx + rk[None, :]
    wp = W + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + rk) < K
        x = tl.load(xp + k0, mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(wp + k0, mask=nm[:, None] & km[None, :], other=0.0)
        if IEEE:  # noqa: SIM108 - Triton JIT source; float32 weights (tests): full precision, not TF32
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            wu = tl.load(wp + N * K + k0, mask=nm[:, None] & km[None, :], other=0.0)
            if IEEE:
                acc_up = tl.dot(x, tl.trans(wu), acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(x, tl.trans(wu), acc_up)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    if GATED:  # as the unfused path rounds: gate and up to the model dtype, silu(gate) rounded, times up
        g = acc.to(Y.dtype.element_ty).to(tl.float32)
        u = acc_up.to(Y.dtype.element_ty)
        y = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty) * u
    else:
        y = acc.to(Y.dtype.element_ty)
    tl.store(Y + rm.to(tl.int64)[:, None] * N + rn[None, :], y, mask=mm[:, None] & nm[None, :])


def usable(x: torch.Tensor) -> bool:
    """Whether `linear` takes these rows (else cuBLAS does): few rows of a 16-bit dtype on CUDA."""
    return x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1


def _config(M: int, N: int, gated: bool) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_k, warps) for M rows and N output columns. Measured on an H200 for the
    Qwen2.5-0.5B shape (benchmarks/skinny_linear.py --sweep): narrow tiles, many programs, for a plain
    projection; 64-wide for the gated one (its two weight tiles per step)."""
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = (64 if N >= 2048 else 32) if gated else 16
    return block_m, block_n, 128, 4


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, gated: bool = False,
           config: tuple[int, int, int, int] | None = None, num_stages: int = 4) -> torch.Tensor:
    """`F.linear(x, w, b)` for few rows; `gated`: `w` is the stacked [gate; up] weight and the result is
    `silu(gate) * up` (the MLP input of the down projection). `w` must be contiguous (a model's weights are)."""
    if not w.is_contiguous() or x.stride(-1) != 1:
        raise ValueError("linear_kernels.linear needs a contiguous weight and unit-stride rows")
    M, K = x.shape
    N = w.shape[0] // 2 if gated else w.shape[0]
    block_m, block_n, block_k, warps = config or _config(M, N, gated)
    per_stage = x.element_size() * block_k * (block_m + (2 if gated else 1) * block_n)
    stages = max(1, min(num_stages, int(0.9 * shared_memory(x.device)) // per_stage))  # fit smaller GPUs
    y = x.new_empty(M, N)
    launch(_skinny_linear, (triton.cdiv(N, block_n), triton.cdiv(M, block_m)), x, w, b if b is not None else w,
           y, M, x.stride(0), N=N, K=K, HAS_BIAS=b is not None, GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n,
           BLOCK_K=block_k, IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return y
