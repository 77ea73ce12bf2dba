"""ParaThinker (arXiv 2509.04475) on our engine: P paths over one prompt, then a summary that reads them all.

Follows the authors' vLLM fork (`LeslieKid/vllm-parathinker`) and training collator (`MobileLLM/ParaThinker`,
`train/custom_data_collator.py`):
- P paths forked from one prompt segment, each at the same offset right after the prompt (positions
  restart), each forced to start with its control token `<think_i>`;
- segment ids 0 for the prompt and the summary, i for path i (the checkpoint's per-layer
  `seg_embeddings` row, added to K and V before RoPE by `Model`);
- a path ends when it samples any stop token (`</think>`, `</think1..8>`, `</summary>`), which is replaced
  by its own `</think_i>` and written into its KV; EOS is an ordinary token inside a path;
- the think stage ends when `finish_share` of the paths ended (authors' default 0.1: the first finish);
- the summary segment views the prompt and every path (no re-prefill) at the offset after the longest
  path, starts with the forced `<summary>...The final answer is` prefix, samples with the paths' sampling
  parameters and ends on a stop token.
Deviations: a path that samples another path's start token or `<summary>` gets it banned (probability 0)
rather than replaced by `<think1>` as in the fork; no `<vllm_pad>` padding (the fork pads prompts and paths
to whole KV blocks for its paged attention; our segments need none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ttscale.backends.engine.kv_cache import KVCache, Segment, View
from ttscale.backends.engine.model import ForwardItem, Model
from ttscale.backends.engine.native_common import SamplingRow, _cache_for, _sample, ban_mask
from ttscale.errors import ConfigError

STOP_NAMES = ["</think>"] + [f"</think{i}>" for i in range(1, 9)] + ["</summary>"]


@dataclass
class ParaThinkerSpec:
    prompt_ids: list[int]
    paths: int = 4
    path_starts: list[list[int]] = field(default_factory=list)  # per path forced start (<think_i>)
    path_ends: list[int] = field(default_factory=list)  # per path end token (</think_i>), written on a stop
    summary_prefix: list[int] = field(default_factory=list)  # forced "<summary>...The final answer is"
    max_think: int = 1024
    max_summary: int = 256
    finish_share: float = 0.1
    end_ids: list[int] = field(default_factory=list)  # stop tokens: a path / the summary ends on these
    summary_end_ids: list[int] = field(default_factory=list)  # extra summary stops (EOS)
    path_banned: list[int] = field(default_factory=list)  # never sampled inside a path (<think_j>, <summary>)
    sampling: SamplingRow = field(default_factory=SamplingRow)
    summary_sampling: SamplingRow | None = None  # None: the paths' sampling (the authors')
    use_segment_ids: bool = True


@dataclass
class ParaThinkerOutcome:
    path_tokens: list[list[int]]  # everything written per path (forced start and end token included)
    path_finished: list[bool]  # ended on a stop token (else cut when the think stage ended)
    summary_tokens: list[int]  # generated after the forced prefix
    summary_finished: bool
    think_forwards: int
    summary_forwards: int
    prompt_tokens: int
    written: dict[str, int]  # tokens written into the cache per stage (prompt, think, summary)
    summary_offset: int
    peak_blocks: int


def _check(model: Model, spec: ParaThinkerSpec) -> None:
    P = spec.paths
    if P < 1:
        raise ConfigError(f"ParaThinker needs >= 1 path (got {P})")
    if not 0 < spec.finish_share <= 1:
        raise ConfigError(f"finish_share must be in (0, 1] (got {spec.finish_share})")
    if len(spec.path_starts) < P or any(not s for s in spec.path_starts[:P]):
        raise ConfigError("every ParaThinker path needs a forced start (its control token)")
    if spec.path_ends and len(spec.path_ends) < P:
        raise ConfigError(f"path_ends names {len(spec.path_ends)} end tokens for {P} paths")
    if not spec.summary_prefix:
        raise ConfigError("the ParaThinker summary needs a forced prefix (<summary>...)")
    seg = getattr(model, "seg_k", None)
    if spec.use_segment_ids and seg is not None and P >= seg.shape[1] - 1:
        raise ConfigError(f"paths={P} needs segment ids 0..{P}; the checkpoint has {seg.shape[1] - 1}")


def parathinker_run(model: Model, spec: ParaThinkerSpec, cache: KVCache | None = None,
                    on_summary=None) -> ParaThinkerOutcome:
    """Run ParaThinker's two stages; see the module docstring. `on_summary(tokens, logits)` observes the
    summary's forwards (tests)."""
    _check(model, spec)
    P = spec.paths
    hint = len(spec.prompt_ids) + P * (spec.max_think + 16) + spec.max_summary + len(spec.summary_prefix) + 64
    cache = cache or _cache_for(model, hint + P * 32)
    sid = (lambda i: i) if spec.use_segment_ids else (lambda i: None)
    written = {"prompt": 0, "think": 0, "summary": 0}
    segs: list[Segment] = []
    try:
        with torch.inference_mode():
            prompt = cache.new_segment(embed_id=sid(0))
            segs.append(prompt)
            model.forward(cache, [ForwardItem([View(prompt, 0)], spec.prompt_ids, logits="none")])
            written["prompt"] = len(spec.prompt_ids)
            prompt.frozen = True
            L = prompt.length
            paths = [cache.new_segment(embed_id=sid(i + 1)) for i in range(P)]
            segs += paths
            toks, finished, forwards, peak = _think(model, cache, spec, prompt, paths, written)
            peak = max(peak, cache.pool.num_used)
            for p in paths:
                p.frozen = True
            offset = L + max(p.length for p in paths)
            summ = cache.new_segment(embed_id=sid(0))
            segs.append(summ)
            views = [View(prompt, 0)] + [View(p, L) for p in paths] + [View(summ, offset)]
            out, done, sforwards, peak = _summarise(model, cache, spec, views, written, peak, on_summary)
            return ParaThinkerOutcome(
                path_tokens=toks, path_finished=finished, summary_tokens=out, summary_finished=done,
                think_forwards=forwards, summary_forwards=sforwards, prompt_tokens=len(spec.prompt_ids),
                written=written, summary_offset=offset, peak_blocks=peak,
            )
    finally:
        for sg in segs:
            sg.release()


def _think(model: Model, cache: KVCache, spec: ParaThinkerSpec, prompt: Segment, paths: list[Segment],
           written: dict[str, int]) -> tuple[list[list[int]], list[bool], int, int]:
    """The think stage: all paths decode in one batch until `finish_share` of them ended. A path that
    samples a stop token writes its own end token in the next forward (the last one: a forward of its own)."""
    P, L = spec.paths, prompt.length
    toks: list[list[int]] = [[] for _ in range(P)]
    pending = [list(spec.path_starts[i]) for i in range(P)]
    finished = [False] * P
    sampled = [0] * P
    need = max(1, math.ceil(spec.finish_share * P))
    stops = set(spec.end_ids)
    ban = ban_mask(model, spec.path_banned) if spec.path_banned else None
    s = spec.sampling
    forwards = peak = 0

    def write(live: list[int], logits: str):
        items = [ForwardItem([View(prompt, 0), View(paths[i], L)], pending[i], write=paths[i], logits=logits)
                 for i in live]
        out = model.forward(cache, items)
        for i in live:
            toks[i].extend(pending[i])
            written["think"] += len(pending[i])
        return out

    while forwards < spec.max_think and sum(finished) < need:
        live = [i for i in range(P) if pending[i]]
        logits = torch.cat(write(live, "last"))
        forwards += 1
        peak = max(peak, cache.pool.num_used)
        rows = [(s.temperature, s.top_p, s.top_k, s.seed * 1009 + i, sampled[i]) for i in live]
        new, _ = _sample(model, logits, rows, ban)
        for i, tok in zip(live, new):
            sampled[i] += 1
            if finished[i]:  # this forward wrote its end token
                pending[i] = []
            elif tok in stops:
                finished[i] = True
                pending[i] = [spec.path_ends[i]] if spec.path_ends else []
            else:
                pending[i] = [tok]
    closing = [i for i in range(P) if finished[i] and pending[i]]
    if closing:  # the paths that ended in the last step write their end token before the summary reads them
        write(closing, "none")
        forwards += 1
    return toks, finished, forwards, peak


def _summarise(model: Model, cache: KVCache, spec: ParaThinkerSpec, views: list[View],
               written: dict[str, int], peak: int, on_summary) -> tuple[list[int], bool, int, int]:
    """The summary: forced prefix, then sampled tokens over the merged views until a stop token."""
    s = spec.sampling
    ss = spec.summary_sampling or s
    stops = set(spec.end_ids) | set(spec.summary_end_ids)
    out: list[int] = []
    done = False
    cur = list(spec.summary_prefix)
    forwards = 0
    for t in range(spec.max_summary + 1):
        [lg] = model.forward(cache, [ForwardItem(views, cur, logits="all" if t == 0 else "last")])
        written["summary"] += len(cur)
        forwards += 1
        peak = max(peak, cache.pool.num_used)
        if on_summary is not None:
            on_summary(list(cur), lg)
        if t == spec.max_summary:
            break
        [tok], _ = _sample(model, lg[-1:], [(ss.temperature, ss.top_p, ss.top_k, ss.seed * 7 + 1, t)])
        if tok in stops:
            done = True
            break
        out.append(tok)
        cur = [tok]
    return out, done, forwards, peak


@dataclass
class ControlTokens:
    """The ParaThinker checkpoint's control-token ids, looked up by name in its tokenizer."""

    think: list[int]  # <think1>..<thinkP>
    think_end: list[int]  # </think1>..</thinkP>
    summary: int  # <summary>
    stops: list[int]  # </think>, </think1..8>, </summary> (those the tokenizer has)
    banned: list[int]  # <think1..8>, <summary>: never sampled inside a path


def control_tokens(tokenizer, paths: int) -> tuple[ControlTokens | None, str]:
    """The control tokens when the tokenizer has `<think_i>`/`</think_i>` (i <= paths), `<summary>` and
    `</summary>` as single tokens; else None and which names are missing."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    need = ([f"<think{i}>" for i in range(1, paths + 1)] + [f"</think{i}>" for i in range(1, paths + 1)]
            + ["<summary>", "</summary>"])
    missing = [n for n in need if n not in vocab]
    if missing:
        return None, "tokenizer lacks the control tokens " + ", ".join(missing)
    starts = [vocab[n] for n in [f"<think{i}>" for i in range(1, 9)] + ["<summary>"] if n in vocab]
    return ControlTokens(
        think=[vocab[f"<think{i}>"] for i in range(1, paths + 1)],
        think_end=[vocab[f"</think{i}>"] for i in range(1, paths + 1)],
        summary=vocab["<summary>"],
        stops=[vocab[n] for n in STOP_NAMES if n in vocab],
        banned=starts,
    ), ""


def control_token_ids(tokenizer, paths: int) -> tuple[list[int], int] | None:
    """(`<think1>`..`<thinkP>` ids, `<summary>` id) when the tokenizer has all the control tokens."""
    ct, _ = control_tokens(tokenizer, paths)
    return None if ct is None else (ct.think, ct.summary)
