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
    def build(cls, rows: list[tuple[float, float, int, int, int]], n: int, device) -> "SamplingTensors":
        rows = rows + [(0.0, 1.0, 0, 0, 0)] * (n - len(rows))
        t, p, k, s, st = zip(*rows) if rows else ((), (), (), (), ())
        floats = torch.tensor([t, p], dtype=torch.float32).view(2, n)
        ints = torch.tensor([k, s, st], dtype=torch.long).view(3, n)
        dev = torch.device(device)
        if dev.type == "cuda":
            floats, ints = floats.pin_memory(), ints.pin_memory()
        return cls(floats.to(dev, non_blocking=True), ints.to(dev, non_blocking=True))

    def tensors(self) -> list[torch.Tensor]:
        return [self.floats, self.ints]


def sample(
    logits: torch.Tensor, st: SamplingTensors, filtered: bool, n_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Tokens `[B]`, their logprobs `[B]` (under the model's unmodified distribution), and with `n_top`
    the top tokens `[B, n_top]` and logprobs. `filtered` applies top-k / top-p (needs a sort)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    greedy_tok = logits.argmax(-1)
    temp = st.temperature.clamp_min(1e-5)[:, None]
    probs = torch.softmax(logits / temp, -1)
    u = uniform(st.seeds, st.steps)
    if filtered:
        sp, si = probs.sort(-1, descending=True)
        cum = sp.cumsum(-1)
        ranks = torch.arange(sp.shape[-1], device=sp.device)[None, :]
        keep = (cum - sp) < st.top_p[:, None]
        keep &= (st.top_k[:, None] <= 0) | (ranks < st.top_k[:, None])
        sp = sp * keep
        cdf = sp.cumsum(-1)
        x = (u.float() * cdf[:, -1])[:, None].contiguous()
        pick = torch.searchsorted(cdf, x, right=True).clamp_max(sp.shape[-1] - 1)
        # never land on a filtered-out (zero-probability) tail entry
        pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)
        sampled = si.gather(-1, pick).squeeze(-1)
    else:
        cdf = probs.cumsum(-1)
        x = (u.float() * cdf[:, -1])[:, None].contiguous()
        sampled = torch.searchsorted(cdf, x, right=True).clamp_max(probs.shape[-1] - 1).squeeze(-1)
    tok = torch.where(st.temperature > 0, sampled, greedy_tok)
    lp = logp.gather(-1, tok[:, None]).squeeze(-1)
    if n_top:
        tl, ti = logp.topk(n_top, -1)
        return tok, lp, ti, tl
    return tok, lp, None, None
