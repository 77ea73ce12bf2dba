"""What the native strategy loops share: sampling rows, banned-token masks, KV workspaces, graph runners,
and the driver that steps them inside the engine's own loop.

The loops themselves live in `native_hogwild` (Hogwild! workers) and `native_parathinker` (ParaThinker
paths); `native` re-exports both for existing imports.

A native run is a *job*: `streams` (one per worker / path, what the Context turns into branches) and a
`steps()` generator that does one batched forward per `next()` and yields the tokens each stream wrote in
it. `NativeDriver` advances every job one step per engine step, on the engine's thread and KV cache, so a
run is stepped, aborted and budgeted like any request: `abort` closes the generator (its `finally`
releases the run's segments) in the engine step that reads the command, and a token cap closes it after
the step that reaches it. `run()` on a job drives the same generator to the end in the caller's thread
(tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ttscale.backends.engine.kv_cache import KVCache
from ttscale.backends.engine.model import Model
from ttscale.backends.engine.sampler import SamplingTensors, sample
from ttscale.errors import ConfigError

if TYPE_CHECKING:
    from ttscale.backends.engine.cuda_graphs import GraphRunner

@dataclass
class SamplingRow:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0


def ban_mask(model: Model, banned: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """`[vocab]` bool mask on the model's device, True at the token ids a loop must never sample."""
    mask = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=model.cfg.device)
    set_banned(mask, banned)
    return mask


def set_banned(mask: torch.Tensor, banned: list[int] | tuple[int, ...]) -> None:
    """Rewrite `mask` in place (a captured CUDA graph reads it at replay) to ban exactly `banned`."""
    bad = [t for t in banned if not 0 <= t < mask.shape[0]]
    if bad:
        raise ConfigError(f"banned token ids {bad} are outside the vocabulary (0..{mask.shape[0] - 1})")
    mask.zero_()
    if banned:
        mask[torch.tensor(list(banned), dtype=torch.long, device=mask.device)] = True


def apply_ban(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits with the banned entries at -inf: they get probability 0 and are never the argmax."""
    if mask is None:
        return logits
    return logits.masked_fill(mask, float("-inf"))


def _sample(model: Model, logits: torch.Tensor, rows: list[tuple[float, float, int, int, int]],
            ban: torch.Tensor | None = None):
    st = SamplingTensors.build(rows, len(rows), model.cfg.device)
    filtered = any(r[1] < 1.0 or r[2] > 0 for r in rows)
    tok, lp, _, _ = sample(apply_ban(logits, ban), st, filtered, 0)
    return tok.tolist(), lp.tolist()


def _graph_runner(model: Model, cache: KVCache, cuda_graphs: bool | None, graphs: GraphRunner | None):
    """The CUDA-graph runner a native loop decodes with: `graphs` as given (on the loop's cache), a new one
    on CUDA (or when `cuda_graphs` asks), None on CPU or when `cuda_graphs` is False.

    A new runner captures forward, ban mask and sampling; its mask is `runner.ban`, rewritten in place by
    each run (`set_banned`) so that the captured graphs serve runs with different banned tokens."""
    if graphs is not None:
        if graphs.cache is not cache:
            raise ConfigError("the graph runner must capture on the same KV cache the run writes")
        return graphs
    on_cuda = model.cfg.device.type == "cuda"
    if cuda_graphs is None:
        cuda_graphs = on_cuda
    if not cuda_graphs:
        return None
    if not on_cuda:
        raise ConfigError("CUDA graphs need the model on a CUDA device")
    from ttscale.backends.engine.cuda_graphs import GraphRunner

    ban = ban_mask(model)

    def forward_ban_sample(meta, st, filtered, n_top):
        return sample(apply_ban(model.forward_meta(cache, meta), ban), st, filtered, n_top)

    runner = GraphRunner(model, cache, step=forward_ban_sample)
    runner.ban = ban  # type: ignore[attr-defined]
    return runner


def _blocks_for(tokens_hint: int, block_size: int = 16) -> int:
    return max(64, 2 * (tokens_hint // block_size + 8))


def _cache_for(model: Model, tokens_hint: int, block_size: int = 16,
               num_blocks: int | None = None) -> KVCache:
    if num_blocks is None:
        num_blocks = _blocks_for(tokens_hint, block_size)
    return KVCache.for_model(model.cfg, num_blocks=num_blocks, block_size=block_size)


class Workspaces:
    """KV caches (with their CUDA-graph runners) kept between native runs on one model, so that a second
    problem replays the graphs the first one captured instead of capturing (and allocating) again.

    `take(num_blocks)` lends a free workspace at least that large, or makes one; concurrent runs get
    different workspaces. `for_model(model)` is the pool of a model, kept on the model itself so that it
    lives and dies with it (a global map would keep every model alive through its graph runners).
    """

    _pools_lock = threading.Lock()

    def __init__(self, model: Model) -> None:
        self.model = model
        self._free: list[tuple[KVCache, GraphRunner | None]] = []
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model: Model) -> Workspaces:
        with cls._pools_lock:
            pool = getattr(model, "_native_workspaces", None)
            if pool is None:
                pool = cls(model)
                model._native_workspaces = pool  # type: ignore[attr-defined]
            return pool

    @contextlib.contextmanager
    def take(self, num_blocks: int) -> Iterator[tuple[KVCache, GraphRunner | None]]:
        with self._lock:
            # the most recently returned one that fits: its graphs are the likeliest to match
            ws = next((w for w in reversed(self._free) if w[0].pool.num_blocks >= num_blocks), None)
            if ws is not None:
                self._free.remove(ws)
        if ws is None:
            cache = KVCache.for_model(self.model.cfg, num_blocks=_pow2_at_least(num_blocks))
            ws = (cache, _graph_runner(self.model, cache, None, None))
        try:
            yield ws
        finally:
            with self._lock:
                self._free.append(ws)


class RunnerPool:
    """CUDA-graph runners on one KV cache (the engine's), lent one per native run: a pipelined run keeps
    its sampled tokens in its runner's static output between steps, so two concurrent runs must not share
    one. Runners come back when their run ends and serve the next run with the graphs they captured."""

    def __init__(self, model: Model, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self._free: list[GraphRunner] = []
        self._lock = threading.Lock()

    def take(self) -> GraphRunner | None:
        """A free runner (a new one when none is free); None where graphs do not apply (CPU)."""
        if self.model.cfg.device.type != "cuda":
            return None
        with self._lock:
            if self._free:
                return self._free.pop()
        return _graph_runner(self.model, self.cache, None, None)

    def give_back(self, runner: GraphRunner | None) -> None:
        if runner is not None:
            with self._lock:
                self._free.append(runner)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()



# ---- native runs inside the engine's loop ------------------------------------------------------------------

@dataclass(frozen=True)
class NativeStream:
    """One stream of a native run (a Hogwild worker, a ParaThinker path or its summary): a branch to the
    Context. `after` names the streams that come before it on the critical path (the summary reads every
    path); `max_tokens` bounds what it can write."""

    name: str
    max_tokens: int
    after: tuple[int, ...] = ()


class NativeJob(Protocol):
    """What `NativeDriver` steps: see the module docstring. The driver only reads its attributes (read-only
    properties here, so a job may compute them)."""

    @property
    def streams(self) -> list[NativeStream]: ...

    @property
    def blocks_hint(self) -> int:
        """KV blocks it may need (the engine makes room by evicting cached prefixes)."""

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt its streams share."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens it prefills that no stream generates (prompt, headers)."""

    @property
    def forwards(self) -> int:
        """Forward passes so far (its critical path)."""

    def steps(self) -> Generator[list[tuple[int, list[int]]], None, None]: ...

    def outcome(self) -> Any: ...

    def release(self) -> None:
        """Free what the run holds (its segments, a lent graph runner); idempotent."""

    @property
    def peak_blocks(self) -> int: ...


class NativeRunBase:
    """What every native job answers the same way: its prompt is its spec's, its peak is tracked in `peak`."""

    spec: Any
    peak: int

    @property
    def peak_blocks(self) -> int:
        return self.peak

    @property
    def prompt_ids(self) -> list[int]:
        return self.spec.prompt_ids


@dataclass
class NativeOutput:
    """Tokens one stream wrote in one step (`text`: their incremental detokenisation)."""

    stream: int
    token_ids: list[int]
    text: str


@dataclass
class NativeDone:
    """The end of a native run: the job's outcome (None when it failed), why it ended ("done", "budget",
    "abort", "error"), the tokens each stream wrote, its forward passes and its peak KV blocks."""

    outcome: Any
    finish: str
    generated: list[int]
    steps: int
    peak_blocks: int
    error: str | None = None


NativeCallback = Callable[[NativeOutput | NativeDone], None]


class StreamText:
    """Incremental detokenisation of one stream: text only once a multi-byte character is complete, from
    two decodes of a short window (the engine's fallback method), so a long stream costs no more a step."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def add(self, ids: list[int]) -> str:
        if self.tok is None:
            return ""
        self.ids.extend(ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


@dataclass
class _Running:
    job: NativeJob
    callback: NativeCallback
    max_generated: int | None
    max_steps: int | None
    texts: list[StreamText]
    it: Generator[list[tuple[int, list[int]]], None, None] | None = None
    generated: list[int] = field(default_factory=list)


class NativeDriver:
    """The engine's native runs: `step()` advances each one forward step (engine thread only)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.runs: dict[str, _Running] = {}

    def add(self, run_id: str, job: NativeJob, callback: NativeCallback, max_generated: int | None,
            max_steps: int | None) -> None:
        if run_id in self.runs:
            callback(NativeDone(None, "error", [0] * len(job.streams), 0, 0, f"duplicate run id {run_id!r}"))
            return
        self.runs[run_id] = _Running(job, callback, max_generated, max_steps,
                                     [StreamText(self.tokenizer) for _ in job.streams],
                                     generated=[0] * len(job.streams))

    def abort(self, run_id: str) -> bool:
        """End a run now (its KV blocks are free when this returns); False when no such run."""
        if run_id not in self.runs:
            return False
        self._end(run_id, "abort")
        return True

    def step(self) -> bool:
        """One forward step of every run; False when there is none."""
        if not self.runs:
            return False
        for rid in list(self.runs):
            r = self.runs[rid]
            if r.it is None:
                r.it = r.job.steps()
            try:
                wrote = next(r.it)
            except StopIteration:
                self._end(rid, "done")
                continue
            except Exception as e:  # noqa: BLE001 - this run fails; the engine and other runs go on
                self._end(rid, "error", f"{type(e).__name__}: {e}")
                continue
            for i, ids in wrote:
                if ids:
                    r.generated[i] += len(ids)
                    r.callback(NativeOutput(i, list(ids), r.texts[i].add(ids)))
            if ((r.max_generated is not None and sum(r.generated) >= r.max_generated)
                    or (r.max_steps is not None and r.job.forwards >= r.max_steps)):
                self._end(rid, "budget")
        return True

    def end_all(self, finish: str, error: str | None = None) -> None:
        for rid in list(self.runs):
            self._end(rid, finish, error)

    def _end(self, run_id: str, finish: str, error: str | None = None) -> None:
        r = self.runs.pop(run_id)
        try:
            if r.it is not None:
                r.it.close()  # the generator's finally releases the run's segments
            r.job.release()  # and this what a run that never started holds
        except Exception as e:  # noqa: BLE001 - reported with the run
            error = error or f"{type(e).__name__}: {e}"
        outcome = None
        if finish != "error":
            try:
                outcome = r.job.outcome()
            except Exception as e:  # noqa: BLE001 - reported with the run
                finish, error = "error", f"{type(e).__name__}: {e}"
        r.callback(NativeDone(outcome, finish, list(r.generated), r.job.forwards, r.job.peak_blocks, error))
