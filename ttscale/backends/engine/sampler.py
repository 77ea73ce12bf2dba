"""Sampling on device: temperature, top-k, top-p, per-branch seeds, logprobs and top-k logprobs.

Randomness is counter-based: a branch's uniform number for its t-th token is a hash of (seed, t), so
the token it draws depends only on its own logits and seed, never on which other branches share the
batch, and the whole step is fixed-shape tensor code (capturable in a CUDA graph). Sampling is by inverse
CDF over the (filtered) distribution; temperature 0 is argmax.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLD = _s64(0x9E3779B97F4A7C15)
_C1 = _s64(0xBF58476D1CE4E5B9)
_C2 = _s64(0x94D049BB133111EB)
_C3 = _s64(0xD1B54A32D192ED03)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _lsr(z, 30)) * _C1
    z = (z ^ _lsr(z, 27)) * _C2
    return z ^ _lsr(z, 31)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float in (0, 1) per row from (seed, step) (splitmix64; int64 arithmetic wraps)."""
    z = _mix(seeds * _GOLD + steps * _C3 + _GOLD)
    z = _mix(z + _GOLD)
    return (_lsr(z, 40).double() + 0.5) / float(1 << 24)


class SamplingTensors:
    """Per-row sampling parameters (padding rows: greedy), packed in two tensors so that a step costs two
    host-to-device copies: `floats [2, B]` (temperature, top_p) and `ints [3, B]` (top_k, seed, step)."""

    def __init__(self, floats: torch.Tensor, ints: torch.Tensor) -> None:
        self.floats, self.ints = floats, ints
        self.temperature, self.top_p = floats[0], floats[1]
        self.top_k, self.seeds, self.steps = ints[0], ints[1], ints[2]

    @classmethod
    def build(cls, rows: list[tuple[float, float, int, int, int]], n: int, device) -> SamplingTensors:
        rows = rows + [(0.0, 1.0, 0, 0, 0)] * (n - len(rows))
        t, p, k, s, st = zip(*rows, strict=True) if rows else ((), (), (), (), ())
        floats = torch.tensor([t, p], dtype=torch.float32).view(2, n)
        ints = torch.tensor([k, s, st], dtype=torch.long).view(3, n)
        dev = torch.device(device)
        if dev.type == "cuda":
            floats, ints = floats.pin_memory(), ints.pin_memory()
        return cls(floats.to(dev, non_blocking=True), ints.to(dev, non_blocking=True))

    def tensors(self) -> list[torch.Tensor]:
        return [self.floats, self.ints]


CHUNK = 1024


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i per row with cdf[i-1] <= u * total < cdf[i], never a zero-probability entry.

    Two levels (chunk sums, then one chunk) instead of one scan over the whole vocabulary: a long
    single-row cumsum is slow on GPU and a batch of rows stays independent either way.
    """
    B, V = probs.shape
    C = -(-V // CHUNK)
    p = torch.nn.functional.pad(probs, (0, C * CHUNK - V)).view(B, C, CHUNK)
    csum = p.sum(-1)
    ccdf = csum.cumsum(-1)
    x = (u.to(probs.dtype) * ccdf[:, -1])[:, None].contiguous()
    ci = torch.searchsorted(ccdf, x, right=True)
    last_c = ((csum > 0) * torch.arange(C, device=probs.device)).amax(-1, keepdim=True)
    ci = torch.minimum(ci, last_c)
    x = x - (ccdf.gather(-1, ci) - csum.gather(-1, ci))
    inner = p.gather(1, ci[:, :, None].expand(B, 1, CHUNK)).squeeze(1)
    icdf = inner.cumsum(-1)
    ii = torch.searchsorted(icdf, x.contiguous(), right=True)
    last_i = ((inner > 0) * torch.arange(CHUNK, device=probs.device)).amax(-1, keepdim=True)
    ii = torch.minimum(ii, last_i)
    return (ci * CHUNK + ii).squeeze(-1)


def cumsum_rows(x: torch.Tensor, padded: bool = False) -> torch.Tensor:
    """Row-wise cumulative sum of `[B, V]` in two levels (within 1,024-wide chunks, then chunk offsets):
    a scan over a few long rows runs on a few GPU blocks and grew with the batch. With `padded`, the
    contiguous `[B, ceil(V / 1024) * 1024]` result (the tail repeats the row total), which binary searches
    take without a copy. On CUDA with Triton, two fused launches (`kernels.cumsum_rows`)."""
    B, V = x.shape
    fused = _fused_cumsum() if x.device.type == "cuda" and x.dtype == torch.float32 else None
    if fused is not None:
        out = fused(x, CHUNK)
    else:
        C = -(-V // CHUNK)
        inner = torch.nn.functional.pad(x, (0, C * CHUNK - V)).view(B, C, CHUNK).cumsum(-1)
        tails = inner[:, :, -1]
        out = (inner + (tails.cumsum(-1) - tails)[:, :, None]).view(B, C * CHUNK)
    return out if padded else out[:, :V]


def _fused_cumsum():
    try:
        from ttscale.backends.engine.kernels import cumsum_rows as fused
    except ImportError:  # no Triton
        return None
    return fused


PACK_BITS = 27  # probability bits kept in a packed sort key; the row index takes the bits above
PACK_ROWS = 1 << (31 - PACK_BITS)  # rows a packed int32 key can tell apart


def sort_rows(probs: torch.Tensor, packed: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `[B, V]` probabilities sorted descending: (values, indices).

    On CUDA, a batch of rows is sorted as one flat array of int32 keys (row index above the top 27 bits
    of the probability's float pattern, which orders like the value for p >= 0): torch sorts several
    long rows as a segmented sort, two radix sorts and their bookkeeping, which cost a batch of 4 about
    as much again as one row. Values closer than 2**-20 relative tie and keep vocabulary order (stable).
    `packed` forces the choice (None: packed on CUDA for 2 to 16 rows).
    """
    B, V = probs.shape
    if packed is None:
        packed = probs.device.type == "cuda" and 1 < B <= PACK_ROWS
    if not packed:
        return probs.sort(-1, descending=True)
    if B > PACK_ROWS or probs.dtype != torch.float32:
        raise ValueError(f"packed sort takes up to {PACK_ROWS} float32 rows (got {B}, {probs.dtype})")
    bits = probs.contiguous().view(torch.int32) >> (30 - PACK_BITS)
    rows = torch.arange(B - 1, -1, -1, device=probs.device, dtype=torch.int32)[:, None] << PACK_BITS
    _, flat = (bits | rows).view(-1).sort(descending=True, stable=True)
    si = (flat.view(B, V) - torch.arange(B, device=probs.device)[:, None] * V)
    return probs.view(-1)[flat].view(B, V), si


def nucleus_pick(sorted_probs: torch.Tensor, cum: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """Index into each descending-sorted row: the nucleus is the shortest prefix whose mass reaches `top_p`
    (at most `top_k` entries when > 0), then inverse CDF over it with `u`; never a zero-probability entry.
    `cum` may run past the row (`cumsum_rows(padded=True)`: the tail repeats the total).

    Two binary searches on the row's cumulative sum `cum`, instead of masking the vocabulary and scanning
    it again: the same pick, without the passes over `[B, V]` that grew with the batch."""
    V = sorted_probs.shape[-1]
    n = torch.searchsorted(cum, top_p.to(cum.dtype)[:, None].contiguous())  # first index with cum >= top_p
    last = (sorted_probs > 0).sum(-1, keepdim=True) - 1
    n = torch.minimum(n, torch.where(top_k > 0, top_k - 1, V - 1)[:, None]).clamp_max(V - 1)
    n = torch.minimum(n, last.clamp_min(0))
    x = (u.to(cum.dtype)[:, None] * cum.gather(-1, n)).contiguous()
    return torch.minimum(torch.searchsorted(cum, x, right=True), n).squeeze(-1)


HEAD = 64  # candidates the CPU path looks at first (a full sort only for rows whose nucleus is wider)


def filtered_pick(probs: torch.Tensor, st: SamplingTensors, u: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """Top-k / top-p token per row. On CPU, from the `head` most likely tokens (`topk`) when the nucleus
    lies inside them (its mass reaches top_p there, or top_k <= head), which is the same pick as from the
    fully sorted row: a sort of every row over the whole vocabulary was most of a CPU step. Other rows,
    and every row on GPU (fixed shapes for CUDA graphs), sort the whole row."""
    V = probs.shape[-1]
    head = min(V, HEAD if head is None else head)
    if probs.device.type == "cpu" and head < V:
        tv, ti = probs.topk(head, -1)
        cum = tv.cumsum(-1)
        inside = (cum[:, -1] >= st.top_p.to(cum.dtype)) | ((st.top_k > 0) & (st.top_k <= head))
        out = ti.gather(-1, nucleus_pick(tv, cum, st.top_p, st.top_k, u)[:, None]).squeeze(-1)
        if bool(inside.all()):
            return out
        rest = (~inside).nonzero().squeeze(-1)
        sp, si = sort_rows(probs[rest])
        pick = nucleus_pick(sp, cumsum_rows(sp, padded=True), st.top_p[rest], st.top_k[rest], u[rest])
        out[rest] = si.gather(-1, pick[:, None]).squeeze(-1)
        return out
    sp, si = sort_rows(probs)
    pick = nucleus_pick(sp, cumsum_rows(sp, padded=True), st.top_p, st.top_k, u)
    return si.gather(-1, pick[:, None]).squeeze(-1)


def sample(
    logits: torch.Tensor, st: SamplingTensors, filtered: bool, n_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Tokens `[B]`, their logprobs `[B]` (under the model's unmodified distribution), and with `n_top`
    the top tokens `[B, n_top]` and logprobs. `filtered` applies top-k / top-p (needs a sort)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, -1, keepdim=True)
    greedy_tok = logits.argmax(-1)
    temp = st.temperature.clamp_min(1e-5)[:, None]
    probs = torch.softmax(logits / temp, -1)
    u = uniform(st.seeds, st.steps)
    sampled = filtered_pick(probs, st, u) if filtered else inverse_cdf(probs, u)
    tok = torch.where(st.temperature > 0, sampled, greedy_tok)
    lp = (logits.gather(-1, tok[:, None]) - lse).squeeze(-1)
    if n_top:
        tl, ti = logits.topk(n_top, -1)
        return tok, lp, ti, tl - lse
    return tok, lp, None, None
