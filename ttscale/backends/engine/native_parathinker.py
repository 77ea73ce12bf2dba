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
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from ttscale.backends.engine.kv_cache import KVCache, Segment, View
from ttscale.backends.engine.model import ForwardItem, Model
from ttscale.backends.engine.native_common import (
    NativeRunBase,
    NativeStream,
    SamplingRow,
    _blocks_for,
    _cache_for,
    _sample,
    ban_mask,
)
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
    if spec.use_segment_ids and seg is not None and P >= seg.shape[1] - 1:  # noqa: SIM300 - P is a variable (paths)
        raise ConfigError(f"paths={P} needs segment ids 0..{P}; the checkpoint has {seg.shape[1] - 1}")


class ParaThinkerRun(NativeRunBase):
    """ParaThinker's two stages as a native job (`native_common`): streams `path1..pathP` and `summary`
    (after every path); `steps()` yields after each forward the tokens each stream wrote in it (a path's
    forced start and end tokens included, the summary's forced prefix not). It writes only its own
    segments; the model is read, never changed, so concurrent runs on one model do not interfere.

    `cache`: the KV cache to write (the engine's, when the engine steps it); None: one of its own, made
    when the run starts. `on_summary(tokens, logits)` observes the summary's forwards (tests)."""

    def __init__(self, model: Model, spec: ParaThinkerSpec, cache: KVCache | None = None,
                 on_summary=None) -> None:
        _check(model, spec)
        self.model, self.spec, self.cache, self.on_summary = model, spec, cache, on_summary
        P = spec.paths
        self.streams = [NativeStream(f"path{i + 1}", spec.max_think + 2) for i in range(P)]
        self.streams.append(NativeStream("summary", spec.max_summary, after=tuple(range(P))))
        hint = len(spec.prompt_ids) + P * (spec.max_think + 16) + spec.max_summary + len(spec.summary_prefix) + 64
        self.blocks_hint = _blocks_for(hint + P * 32, 16 if cache is None else cache.block_size)
        self.written = {"prompt": 0, "think": 0, "summary": 0}
        self.path_tokens: list[list[int]] = [[] for _ in range(P)]
        self.path_finished = [False] * P
        self.summary_tokens: list[int] = []
        self.summary_finished = False
        self.think_forwards = self.summary_forwards = 0
        self.summary_offset = 0
        self.peak = 0
        self.segs: list[Segment] = []

    @property
    def prompt_tokens(self) -> int:
        return len(self.spec.prompt_ids)

    @property
    def forwards(self) -> int:
        return self.think_forwards + self.summary_forwards

    def _note_peak(self) -> None:
        self.peak = max(self.peak, sum(len(s.blocks) for s in self.segs))

    def run(self) -> ParaThinkerOutcome:
        """Drive `steps()` to the end in this thread."""
        for _ in self.steps():
            pass
        return self.outcome()

    def outcome(self) -> ParaThinkerOutcome:
        return ParaThinkerOutcome(
            path_tokens=[list(t) for t in self.path_tokens], path_finished=list(self.path_finished),
            summary_tokens=list(self.summary_tokens), summary_finished=self.summary_finished,
            think_forwards=self.think_forwards, summary_forwards=self.summary_forwards,
            prompt_tokens=len(self.spec.prompt_ids), written=dict(self.written),
            summary_offset=self.summary_offset, peak_blocks=self.peak,
        )

    def steps(self) -> Generator[list[tuple[int, list[int]]], None, None]:
        """One forward per `next()`; closing it releases the run's KV."""
        spec, model = self.spec, self.model
        P = spec.paths
        if self.cache is None:
            self.cache = _cache_for(model, 0, num_blocks=self.blocks_hint)
        cache = self.cache
        sid = (lambda i: i) if spec.use_segment_ids else (lambda i: None)
        try:
            with torch.inference_mode():
                prompt = cache.new_segment(embed_id=sid(0))
                self.segs.append(prompt)
                model.forward(cache, [ForwardItem([View(prompt, 0)], spec.prompt_ids, logits="none")])
                self.written["prompt"] = len(spec.prompt_ids)
                prompt.frozen = True
                L = prompt.length
                paths = [cache.new_segment(embed_id=sid(i + 1)) for i in range(P)]
                self.segs += paths
                yield from self._think(prompt, paths)
                for p in paths:
                    p.frozen = True
                offset = self.summary_offset = L + max(p.length for p in paths)
                summ = cache.new_segment(embed_id=sid(0))
                self.segs.append(summ)
                views = [View(prompt, 0)] + [View(p, L) for p in paths] + [View(summ, offset)]
                yield from self._summarise(views)
        finally:
            self.release()

    def release(self) -> None:
        """Release the run's segments; idempotent."""
        for sg in self.segs:
            sg.release()
        self.segs = []

    def _think(self, prompt: Segment, paths: list[Segment]) -> Iterator[list[tuple[int, list[int]]]]:
        """The think stage: all paths decode in one batch until `finish_share` of them ended. A path that
        samples a stop token writes its own end token in the next forward (the last one: a forward of its
        own)."""
        spec, model, cache = self.spec, self.model, self.cache
        assert cache is not None
        P, L = spec.paths, prompt.length
        toks, finished = self.path_tokens, self.path_finished
        pending = [list(spec.path_starts[i]) for i in range(P)]
        sampled = [0] * P
        need = max(1, math.ceil(spec.finish_share * P))
        stops = set(spec.end_ids)
        ban = ban_mask(model, spec.path_banned) if spec.path_banned else None
        s = spec.sampling

        def write(live: list[int], logits: Literal["last", "all", "none"]):
            items = [ForwardItem([View(prompt, 0), View(paths[i], L)], pending[i], write=paths[i],
                                 logits=logits) for i in live]
            out = model.forward(cache, items)
            for i in live:
                toks[i].extend(pending[i])
                self.written["think"] += len(pending[i])
            self.think_forwards += 1
            self._note_peak()
            return out, [(i, list(pending[i])) for i in live]

        while self.think_forwards < spec.max_think and sum(finished) < need:
            live = [i for i in range(P) if pending[i]]
            out, wrote = write(live, "last")
            logits = torch.cat(out)
            rows = [(s.temperature, s.top_p, s.top_k, s.seed * 1009 + i, sampled[i]) for i in live]
            new, _ = _sample(model, logits, rows, ban)
            for i, tok in zip(live, new, strict=True):
                sampled[i] += 1
                if finished[i]:  # this forward wrote its end token
                    pending[i] = []
                elif tok in stops:
                    finished[i] = True
                    pending[i] = [spec.path_ends[i]] if spec.path_ends else []
                else:
                    pending[i] = [tok]
            yield wrote
        closing = [i for i in range(P) if finished[i] and pending[i]]
        if closing:  # the paths that ended in the last step write their end token before the summary reads them
            yield write(closing, "none")[1]

    def _summarise(self, views: list[View]) -> Iterator[list[tuple[int, list[int]]]]:
        """The summary: forced prefix, then sampled tokens over the merged views until a stop token."""
        spec, model, cache = self.spec, self.model, self.cache
        assert cache is not None
        ss = spec.summary_sampling or spec.sampling
        stops = set(spec.end_ids) | set(spec.summary_end_ids)
        cur = list(spec.summary_prefix)
        P = spec.paths
        for t in range(spec.max_summary + 1):
            [lg] = model.forward(cache, [ForwardItem(views, cur, logits="all" if t == 0 else "last")])
            self.written["summary"] += len(cur)
            self.summary_forwards += 1
            self._note_peak()
            if self.on_summary is not None:
                self.on_summary(list(cur), lg)
            if t == spec.max_summary:
                break
            # a fresh row: the view's start is 16-byte aligned only for vocabularies of a multiple of 4 (one
            # more specialisation of the sampler's kernels otherwise)
            [tok], _ = _sample(model, lg[-1:].clone(), [(ss.temperature, ss.top_p, ss.top_k, ss.seed * 7 + 1, t)])
            if tok in stops:
                self.summary_finished = True
                break
            self.summary_tokens.append(tok)
            cur = [tok]
            yield [(P, [tok])]


def parathinker_run(model: Model, spec: ParaThinkerSpec, cache: KVCache | None = None,
                    on_summary=None) -> ParaThinkerOutcome:
    """Run ParaThinker's two stages in this thread; see `ParaThinkerRun`."""
    return ParaThinkerRun(model, spec, cache, on_summary).run()


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
