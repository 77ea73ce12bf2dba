"""Sampling on device: temperature, top-k, top-p, per-branch seeds, logprobs and top-k logprobs.

Randomness is counter-based: a branch's uniform number `u` for its t-th token is a hash of (seed, t)
(`uniform`), so the token it draws depends only on its own logits and seed, never on which other
branches share the batch, and the whole step is fixed-shape device code (capturable in a CUDA graph).

What a row draws (the torch path here and the fused Triton path in `sample_kernels` agree token for
token):
- temperature 0: argmax (the first index among ties, like `torch.argmax`);
- otherwise probs = softmax(logits / T), and
  - unfiltered rows (top_p >= 1, top_k <= 0): inverse CDF in vocabulary order over probs: the first index
    i with cdf[i] > u * total, never a zero-probability entry;
  - filtered rows: tau = max(tau_p, tau_k) where tau_p is the probability of the last entry of the shortest
    descending-sorted prefix whose mass reaches top_p (the smallest probability when top_p >= 1) and tau_k
    the top_k-th largest probability (no bound when top_k <= 0); the nucleus is every token with
    prob >= tau (all ties at tau included), and the draw is the inverse CDF in vocabulary order over probs
    restricted to the nucleus. No sort is needed to draw: only tau, which the GPU path finds by bracketing
    it on the float's bit pattern.
- the logprob of the drawn token is under the unmodified distribution: logits[tok] - logsumexp(logits).
"""

from __future__ import annotations

import os

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
    host-to-device copies: `floats [2, W]` (temperature, top_p) and `ints [3, W]` (top_k, seed, step), of
    which the first `n` columns are the rows. W is n rounded up to 4, so that every row view starts 16-byte
    aligned whatever n is: Triton specialises the sampler's kernels on that, one more compile each."""

    def __init__(self, floats: torch.Tensor, ints: torch.Tensor, n: int | None = None) -> None:
        self.floats, self.ints = floats, ints
        self.n = n = floats.shape[1] if n is None else n
        self.temperature, self.top_p = floats[0, :n], floats[1, :n]
        self.top_k, self.seeds, self.steps = ints[0, :n], ints[1, :n], ints[2, :n]

    @classmethod
    def build(cls, rows: list[tuple[float, float, int, int, int]], n: int, device) -> SamplingTensors:
        width = n + (-n % 4)
        rows = rows + [(0.0, 1.0, 0, 0, 0)] * (width - len(rows))
        t, p, k, s, st = zip(*rows, strict=True) if rows else ((), (), (), (), ())
        floats = torch.tensor([t, p], dtype=torch.float32).view(2, width)
        ints = torch.tensor([k, s, st], dtype=torch.long).view(3, width)
        dev = torch.device(device)
        if dev.type == "cuda":
            floats, ints = floats.pin_memory(), ints.pin_memory()
        return cls(floats.to(dev, non_blocking=True), ints.to(dev, non_blocking=True), n)

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


HEAD = 64  # candidates the CPU path looks at first (a full sort only for rows whose nucleus is wider)


def _threshold_from_head(tv: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                         V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tau per row from its `head` largest probabilities `tv` (descending) and the row's total mass, and
    which rows need more than the head (the top-p mass is not reached there and top_k is not inside)."""
    head = tv.shape[-1]
    n_p = (tv.double().cumsum(-1) < (top_p.double() * total)[:, None]).sum(-1)
    tau_p = torch.where(top_p < 1, tv.gather(-1, n_p.clamp_max(head - 1)[:, None]).squeeze(-1), 0.0)
    k = top_k.clamp(0, V)
    tau_k = torch.where(k > 0, tv.gather(-1, (k - 1).clamp(0, head - 1)[:, None]).squeeze(-1), 0.0)
    tau = torch.where((top_p < 1) | (k > 0), torch.maximum(tau_p, tau_k), 0.0)
    k_inside = (k > 0) & (k <= head)
    wider = ((top_p < 1) & (n_p >= head) & ~k_inside) | ((top_p >= 1) & (k > head))
    return tau, wider & (head < V)


def nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                      head: int | None = None) -> torch.Tensor:
    """tau per row of `[B, V]` probabilities (0 for rows without top-p / top-k; see the module docstring).

    On CPU from the `head` most likely tokens (`topk`) where they hold it (the top-p mass is reached
    there, or 1 <= top_k <= head); only the other rows sort their whole row (a sort of every row was most
    of a CPU step). Elsewhere (the torch path on GPU, without Triton) every row is sorted: fixed shapes,
    no host synchronisation."""
    V = probs.shape[-1]
    head = V if probs.device.type != "cpu" else min(V, HEAD if head is None else head)
    tv = probs.topk(head, -1).values if head < V else probs.sort(-1, descending=True).values
    tau, wider = _threshold_from_head(tv, probs.sum(-1, dtype=torch.float64), top_p, top_k, V)
    if head < V and bool(wider.any()):
        rows = wider.nonzero().squeeze(-1)
        tau[rows] = nucleus_threshold(probs[rows], top_p[rows], top_k[rows], head=V)
    return tau


def filtered_pick(probs: torch.Tensor, st: SamplingTensors, u: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """Top-k / top-p token per row: the inverse CDF in vocabulary order over the nucleus (prob >= tau).

    On CPU, rows whose whole nucleus lies in the `head` most likely tokens draw from those alone (in
    vocabulary order): no pass over the vocabulary beyond `topk` and the row sums."""
    B, V = probs.shape
    head = min(V, HEAD if head is None else head)
    if probs.device.type != "cpu" or head >= V:
        tau = nucleus_threshold(probs, st.top_p, st.top_k, head)
        return inverse_cdf(probs * (probs >= tau[:, None]), u)
    tv, ti = probs.topk(head, -1)
    tau, wider = _threshold_from_head(tv, probs.sum(-1, dtype=torch.float64), st.top_p, st.top_k, V)
    unfiltered = (st.top_p >= 1) & (st.top_k <= 0)
    in_head = ~wider & ~unfiltered & (tv[:, -1] < tau)
    ids, order = ti.sort(-1)
    vals = tv.gather(-1, order)
    vals = vals * (vals >= tau[:, None])
    cum = vals.cumsum(-1)
    pick = torch.searchsorted(cum, (u.to(cum.dtype) * cum[:, -1])[:, None].contiguous(), right=True)
    last = ((vals > 0) * torch.arange(head)).amax(-1, keepdim=True)
    out = ids.gather(-1, torch.minimum(pick, last)).squeeze(-1)
    if bool(in_head.all()):
        return out
    if bool(wider.any()):
        rows = wider.nonzero().squeeze(-1)
        tau[rows] = nucleus_threshold(probs[rows], st.top_p[rows], st.top_k[rows], head=V)
    rest = (~in_head).nonzero().squeeze(-1)
    out[rest] = inverse_cdf(probs[rest] * (probs[rest] >= tau[rest, None]), u[rest])
    return out


def sample(
    logits: torch.Tensor, st: SamplingTensors, filtered: bool, n_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Tokens `[B]`, their logprobs `[B]` (under the model's unmodified distribution), and with `n_top`
    the top tokens `[B, n_top]` and logprobs. `filtered` applies top-k / top-p (rows without them are
    drawn as unfiltered either way). On CUDA with Triton, the fused kernels (`sample_kernels`)."""
    if logits.is_cuda:
        fused = _fused_sample()
        if fused is not None:
            return fused(logits, st, filtered, n_top)
    return sample_torch(logits, st, filtered, n_top)


def _fused_sample():
    """The fused sampler, or None without Triton or with `TTSCALE_FUSED_SAMPLER=0` (the torch path, e.g.
    for an A/B)."""
    if os.environ.get("TTSCALE_FUSED_SAMPLER", "1") == "0":
        return None
    try:
        from ttscale.backends.engine.sample_kernels import sample as fused
    except ImportError:  # no Triton
        return None
    return fused


def sample_torch(
    logits: torch.Tensor, st: SamplingTensors, filtered: bool, n_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`sample` in plain torch: the CPU path and the reference the fused kernels are tested against."""
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
