"""Top-k / top-p for vLLM's CPU sampler without sorting the vocabulary.

vLLM-CPU (no Triton) filters top-p by sorting every row of logits (`apply_top_k_top_p_pytorch`): at 20 rows
x 49,152 tokens that sort took 81 ms a step on one core, a quarter of the in-process engine thread's time
in a smoke eval (py-spy). The nucleus of a language model's next-token distribution is almost always a
handful of tokens, so `head_first_top_k_top_p` finds it among the `topk` largest logits and sorts a whole
row only when the nucleus is wider than its largest head.

Same filter as vLLM's, token for token except where float rounding puts a token exactly on the edge:
top-k first (every logit below the k-th largest masked, ties kept), then top-p over the distribution
renormalised over what top-k left: a token is kept when the probability mass strictly above it is below
`p` (vLLM: the ascending cumulative sum up to it exceeds `1 - p`), the most likely token always; at top-p 1
only tokens whose float32 probability is 0 go. A row with tied logits across the top-p edge (common with
bfloat16 logits: 4 % of rows in a smoke eval) is sorted whole, since which of the tied tokens vLLM keeps
depends on its unstable sort.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

HEADS = (64, 1024)  # candidate counts tried in turn before a row is sorted whole

Filter = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def sorted_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """vLLM 0.32's `apply_top_k_top_p_pytorch` (sort path): the reference the head-first filter falls back
    to and is tested against. Masks `logits` in place and returns it."""
    if p is None and k is None:
        return logits
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        kth = logits_sort.gather(1, (logits_sort.size(1) - k.to(torch.long)).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < kth, -float("inf"))
    if p is not None:
        probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
        top_p_mask[:, -1] = False
        logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return logits.scatter_(dim=-1, index=logits_idx, src=logits_sort)


def _mask_top_k(logits: torch.Tensor, k: torch.Tensor, head: int) -> torch.Tensor:
    """Mask below the k-th largest logit of rows with 1 <= k <= head (in place); the rows with a larger
    k < V, which need more than the head, are returned."""
    V = logits.shape[-1]
    k = k.to(torch.long)
    active = (k > 0) & (k < V)
    inside = active & (k <= head)
    if bool(inside.any()):
        rows = inside.nonzero().squeeze(-1)
        sub = logits[rows]
        kth = sub.topk(int(k[rows].max()), -1).values.gather(1, (k[rows] - 1).unsqueeze(1))
        logits[rows] = sub.masked_fill_(sub < kth, -float("inf"))
    return active & ~inside


def head_first_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                           heads: tuple[int, ...] = HEADS, full: Filter = sorted_top_k_top_p) -> torch.Tensor:
    """`full`'s top-k / top-p filter of `[B, V]` float logits (masked with -inf in place, returned), found in
    each row's `heads[i]` largest logits where they hold the nucleus; `full` runs only on rows where the
    largest head does not (a top-k past it, a nucleus wider than it, or a tie across its edge)."""
    if p is None:
        return full(logits, k, p)
    B, V = logits.shape
    unresolved = torch.zeros(B, dtype=torch.bool)
    source = logits
    if k is not None:  # the rows `full` filters must be as given: its sort orders ties by where things are
        source = logits.clone()
        unresolved |= _mask_top_k(logits, k, max(heads))
    whole = ((p >= 1) & ~unresolved).nonzero().squeeze(-1)
    if whole.numel():  # top-p 1 masks only what has no probability in float32, as vLLM's cumulative sum does
        sub = logits[whole]
        logits[whole] = sub.masked_fill_(sub.softmax(-1) == 0, -float("inf"))
    todo = ((p < 1) & ~unresolved).nonzero().squeeze(-1)
    for head in heads:
        if todo.numel() == 0 or head >= V:
            break
        sub = logits[todo]
        top = sub.topk(head, -1).values
        probs = (top - torch.logsumexp(sub, -1, keepdim=True)).exp().double()
        above = probs.cumsum(-1) - probs
        keep = (above < p[todo].double().unsqueeze(1)).sum(-1).clamp_min(1)
        inside = keep < head
        edge = top.gather(1, (keep - 1).unsqueeze(1))
        # a tie across the edge: vLLM keeps the tied tokens its sort happened to put last; only it can say which
        split = inside & (top.gather(1, keep.clamp_max(head - 1).unsqueeze(1)) == edge).squeeze(1)
        done = inside & ~split
        if bool(done.any()):
            rows = todo[done]
            logits[rows] = sub[done].masked_fill_(sub[done] < edge[done], -float("inf"))
        unresolved[todo[split]] = True
        todo = todo[~inside]
    unresolved[todo] = True  # what no head settled
    if bool(unresolved.any()):
        rows = unresolved.nonzero().squeeze(-1)
        logits[rows] = full(source[rows], None if k is None else k[rows], p[rows])
    return logits


@functools.cache
def install() -> bool:
    """Route vLLM's CPU sampler through `head_first_top_k_top_p` in this process (once; other devices keep
    vLLM's own filter). Returns whether vLLM's sampler module was there to patch."""
    try:
        from vllm.v1.sample.ops import topk_topp_sampler as sampler_ops
    except ImportError:
        return False
    vllm_filter: Filter = sampler_ops.apply_top_k_top_p

    def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
        if logits.device.type != "cpu" or p is None:
            return vllm_filter(logits, k, p)
        return head_first_top_k_top_p(logits, k, p, full=vllm_filter)

    apply_top_k_top_p.vllm_filter = vllm_filter  # type: ignore[attr-defined]  # to put it back (tests, A/B)
    sampler_ops.apply_top_k_top_p = apply_top_k_top_p
    return True
