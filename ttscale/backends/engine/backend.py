"""`EngineBackend`: the Backend protocol over our in-process engine.

The engine steps in its own thread; this side only turns requests into token ids (chat template from the
tokenizer), gives the engine a reader for each stream (`StreamReader`, an `OutputSink`), and turns what it reads
into Deltas.
Closing or cancelling the consumer of `generate()` aborts the request (its blocks are free after the
engine's next step).

Outputs cross threads in batches: `ttscale.backends.engine.handoff`.

`run_native` starts a native run (Hogwild, ParaThinker: `native_common`) that the engine steps in its own
loop, and returns one Delta stream per worker / path plus a future of the run's end; closing any of the
streams early aborts the whole run (its blocks are free after the engine's next step).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from ttscale.backends.base import BackendBase, Capabilities, DeltaStream, ForkedStream
from ttscale.backends.engine.engine import Engine, RequestOutput
from ttscale.backends.engine.handoff import Channel, Inbox, StreamReader
from ttscale.backends.engine.native_common import NativeDone, NativeJob, NativeOutput
from ttscale.backends.engine.request import OutputSink
from ttscale.errors import BackendError, ConfigError
from ttscale.types import Delta, GenerationRequest, SamplingSpec, ScoreRequest, ScoreResult, StrictModel


class EngineConfig(StrictModel):
    """How to build the engine. `model`: "default" (bundled SmolLM2-135M-Instruct), a HF folder or a .gguf."""

    model: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_gb: float | None = None
    prefill_chunk: int | None = None
    max_running: int = 1024
    cuda_graphs: bool | None = None
    prefix_cache: bool = True
    fused_kernels: bool | None = None
    stream_interval_ms: float = Field(
        20.0, ge=0.0, description="longest wait before new tokens reach asyncio (0: hand over at once)")
    handoff_share: float = Field(
        0.2, gt=0.0, le=1.0, description="most of the event loop's time spent consuming engine outputs: "
        "hand-offs are spaced further apart than stream_interval_ms when consuming them takes more")
    gil_switch_ms: float | None = Field(
        0.5, gt=0.0, description="GIL switch interval while the engine thread runs (None: leave Python's)")
    gc_gen0: int | None = Field(
        50_000, ge=700, description="young-generation GC threshold while the engine thread runs, with the "
        "objects that exist at its start frozen (None: leave the GC alone; see quiet_gc.QuietGC)")


def to_params(s: SamplingSpec, detokenize: bool = True) -> SamplingSpec:
    """The engine's parameters for `s`: the same spec (one type), with `detokenize` off when asked; fields
    the engine cannot apply are refused with their names."""
    if unsupported := s.penalties_set():
        raise ConfigError(f"the engine backend does not apply {', '.join(unsupported)}; leave them unset "
                          "or use a vLLM backend")
    return s if detokenize or not s.detokenize else s.model_copy(update={"detokenize": False})


def top_logprob_texts(tokenizer: Any, tops: dict[int, float]) -> dict[str, float]:
    """Candidate token -> logprob keyed by text, as the Delta type has it, with one key per candidate.

    Distinct ids can decode to the same text (byte-fallback pieces of one UTF-8 character all decode to
    U+FFFD); keyed by decoded text alone they overwrite each other and a top-20 entry keeps as few as 3
    candidates, which starved DeepConf's confidence. A colliding candidate is keyed by its vocabulary
    token instead (unique per id), and by its id as a last resort."""
    out: dict[str, float] = {}
    for t, lp in tops.items():
        key = tokenizer.decode([t])
        if key in out:
            key = tokenizer.convert_ids_to_tokens(t)
            if key in out or not isinstance(key, str):
                key = f"<id:{t}>"
        out[key] = lp
    return out


PROMPT_MEMO_SIZE = 4096  # distinct chats whose token ids EngineBackend keeps

_NATIVE_FINISH = {"done": "stop", "budget": "length", "abort": "abort", "error": "error"}


@dataclass
class NativeHandle:
    """A native run on the engine: its id, one Delta stream per job stream, and its end (`done`)."""

    run_id: str
    streams: list[AsyncGenerator[Delta, None]]
    done: asyncio.Future[NativeDone]


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


class EngineBackend(BackendBase):
    """In-process engine with shared-KV fork, abort, score and top-20 logprobs."""

    name = "engine"

    def __init__(self, config: EngineConfig | None = None, *, engine: Engine | None = None, **kw: Any) -> None:
        self.config = config or EngineConfig(**kw)
        if engine is None:
            from ttscale.backends.engine.loader import load_model, load_tokenizer

            c = self.config
            model = load_model(c.model, dtype=c.dtype, device=c.device)
            assert model.path is not None, "load_model records the checkpoint folder"
            tok = load_tokenizer(model.path)
            engine = Engine(
                model, tok, num_blocks=c.num_blocks, block_size=c.block_size, kv_memory_gb=c.kv_memory_gb,
                prefill_chunk=c.prefill_chunk, max_running=c.max_running, cuda_graphs=c.cuda_graphs,
                prefix_cache=c.prefix_cache, fused_kernels=c.fused_kernels,
            )
        if engine.tokenizer is None:
            raise ConfigError("EngineBackend needs an engine with a tokenizer")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.capabilities = Capabilities(
            streaming=True, abort=True, n_per_request=False, token_ids=True, top_logprobs=20, score=True,
            tokenize=True, prefix_cache=True, shared_kv_fork=True, kv_merge=True, concurrent_views=True,
            parallel_streams=False, chat=self.tokenizer.chat_template is not None, completion=True,
            max_context=engine.max_context, chat_ids=self.tokenizer.chat_template is not None,
            engine_native=True,
        )
        self._ids = itertools.count()
        self._started = False
        self._inboxes: dict[asyncio.AbstractEventLoop, Inbox] = {}
        self._prompt_memo: dict[tuple[str, bool], tuple[int, ...]] = {}

    @classmethod
    def default(cls, **kw: Any) -> EngineBackend:
        """The bundled SmolLM2-135M-Instruct on CPU or CUDA: works with no server and no download."""
        return cls(EngineConfig(model="default", **kw))

    async def start(self) -> EngineBackend:
        """Start the engine's step thread (the model is loaded when the backend is built). Idempotent."""
        self._start()
        return self

    def _start(self) -> None:
        if not self._started:
            ms = self.config.gil_switch_ms
            self.engine.start(switch_interval_s=None if ms is None else ms / 1000, gc_gen0=self.config.gc_gen0)
            self._started = True

    # ---- prompts ----------------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict[str, Any]], continue_final_message: bool = False) -> list[int]:
        """Token ids of a chat. The n samples of a question send the same messages: rendering the template
        and encoding (~1 ms each, on the event loop) is done once per distinct chat (`_prompt_memo`)."""
        if self.tokenizer.chat_template is None:
            raise ConfigError("this model's tokenizer has no chat template; send `prompt` or token ids")
        key = (json.dumps(messages, sort_keys=True, default=str), continue_final_message)
        ids = self._prompt_memo.get(key)
        if ids is None:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
            )
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            if len(self._prompt_memo) >= PROMPT_MEMO_SIZE:
                self._prompt_memo.pop(next(iter(self._prompt_memo)))  # the oldest entry
            self._prompt_memo[key] = ids
        return list(ids)

    def prompt_ids(self, prompt: str | None, messages, token_ids, continue_final_message: bool) -> list[int]:
        if token_ids is not None:
            return list(token_ids)
        if messages is not None:
            return self.chat_ids(messages, continue_final_message)
        return self.tokenizer.encode(prompt)

    # ---- protocol -----------------------------------------------------------------------------------------
    def _delta(self, out: RequestOutput) -> Delta:
        return self._make_delta(out.request_id, out.token_ids, out.logprobs, out.top_logprobs, out.text,
                                out.finished, out.finish_reason, out.error, out.prompt_tokens, out.cached_tokens)

    def _make_delta(self, rid: str, ids: list[int], lps: list[float], tops: list[dict[int, float]] | None,
                    text: str, finished: bool, reason: str | None, error: str | None, prompt: int,
                    cached: int) -> Delta:
        texts = [top_logprob_texts(self.tokenizer, d) for d in tops] if tops else None
        return Delta(  # validated in pydantic-core: faster than the Python-level model_construct
            request_id=rid, text=text, token_ids=ids, num_tokens=None, logprobs=lps, top_logprobs=texts,
            finished=finished, finish_reason=reason, prompt_tokens=prompt, cached_prompt_tokens=cached,
            error=error,
        )

    def _inbox(self) -> Inbox:
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            self._inboxes = {lp: ib for lp, ib in self._inboxes.items() if not lp.is_closed()}
            inbox = self._inboxes[loop] = Inbox(loop, self.config.stream_interval_ms / 1000,
                                                 self.config.handoff_share)
        return inbox

    def _channel(self) -> tuple[Channel, Any]:
        """A channel and the engine-thread callback that feeds it (native runs' outputs)."""
        inbox = self._inbox()
        ch = Channel()
        return ch, (lambda out: inbox.put(ch, out))

    async def _stream(self, rid: str, ch: Channel | StreamReader | None, request: GenerationRequest | None = None
                      ) -> DeltaStream:
        """Deltas from `ch`; with `request` (and no `ch`), first sends it to the engine (`generate`)."""
        done, sent = False, request is None
        try:
            if request is not None:
                if request.chat_template_kwargs:
                    raise ConfigError("the engine backend does not take chat_template_kwargs; leave them unset")
                ids = self.prompt_ids(request.prompt, request.messages, request.prompt_token_ids,
                                      request.continue_final_message)
                self._start()
                ch = StreamReader(self._inbox())
                self.engine.add_request(rid, ids, to_params(request.sampling), ch)
                sent = True
            if ch is None:
                raise ConfigError("a stream needs its channel or its request")
            while True:
                if isinstance(ch, StreamReader):
                    r, ids, lps, tops, text, reason, error = await ch.next()
                    d = self._make_delta(rid, ids, lps, tops, text, reason is not None, reason, error,
                                         len(r.prompt_ids), r.cached_tokens)
                else:
                    d = self._delta(await ch.take())
                if d.finished:
                    done = True
                yield d
                if done:
                    return
        finally:
            if sent and not done:
                self.engine.abort(rid)

    def generate(self, request: GenerationRequest) -> DeltaStream:
        """Stream one branch; see the module docstring for cancellation. The request is checked and sent
        when iteration starts; the stream is `_stream` itself, with no generator wrapped around it (each
        layer costs every Delta a resumption)."""
        return self._stream(request.request_id, None, request)

    def fork(self, request_id: str, n: int, sampling: SamplingSpec | None = None) -> list[ForkedStream]:
        """Branch a running request into n children sharing its KV so far (copy-on-write of the last
        partial block only). Returns (child request id, delta stream) pairs; a child's deltas carry only
        tokens generated after the fork. Must be called from the event loop thread."""
        if n < 1:
            raise ConfigError(f"fork needs n >= 1 (got {n})")
        self._start()
        children: list[str] = []
        streams: list[ForkedStream] = []
        sinks: list[Callable[[RequestOutput], None] | OutputSink | None] = []
        inbox = self._inbox()
        for _ in range(n):
            cid = f"{request_id}/fork{next(self._ids)}"
            sink = StreamReader(inbox)
            children.append(cid)
            sinks.append(sink)
            streams.append((cid, self._stream(cid, sink)))
        self.engine.fork(request_id, children, sinks, to_params(sampling) if sampling else None)
        return streams

    def run_native(self, run_id: str, job: NativeJob, *, max_generated: int | None = None,
                   max_steps: int | None = None) -> NativeHandle:
        """Start `job` in the engine's loop (see the module docstring). Stream i's deltas carry the tokens
        job stream i wrote; stream 0 carries the run's prompt tokens. `max_generated` (tokens, all streams)
        and `max_steps` (forwards) end it after the step that reaches them. Call from the event loop."""
        self._start()
        loop = asyncio.get_running_loop()
        names = [f"{run_id}/{s.name}" for s in job.streams]
        prompt = int(getattr(job, "prompt_tokens", 0))
        chans = [self._channel() for _ in names]
        done: asyncio.Future[NativeDone] = loop.create_future()

        def on_output(out: NativeOutput | NativeDone) -> None:  # engine thread
            if isinstance(out, NativeOutput):
                i = out.stream
                chans[i][1](RequestOutput(names[i], out.token_ids, [], text=out.text,
                                          prompt_tokens=prompt if i == 0 else 0))
                return
            reason = _NATIVE_FINISH[out.finish]
            for i, (_, put) in enumerate(chans):
                put(RequestOutput(names[i], [], [], finished=True, finish_reason=reason, error=out.error,
                                  prompt_tokens=prompt if i == 0 else 0))
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it any more
                loop.call_soon_threadsafe(_resolve, done, out)

        self.engine.add_native(run_id, job, on_output, max_generated=max_generated, max_steps=max_steps)
        return NativeHandle(run_id, [self._stream(run_id, ch) for ch, _ in chans], done)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        ctx = self.prompt_ids(request.prompt, request.messages, request.prompt_token_ids,
                              request.continue_final_message)
        cont = (list(request.continuation_token_ids) if request.continuation_token_ids is not None
                else self.tokenizer.encode(request.continuation, add_special_tokens=False))
        self._start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        def deliver(res: list[float] | BaseException) -> None:
            loop.call_soon_threadsafe(fut.set_result, res)

        self.engine.score(ctx, cont, deliver)
        res = await fut
        if isinstance(res, BaseException):
            raise BackendError(f"score failed: {res}") from res
        return ScoreResult(token_ids=cont, logprobs=res)

    async def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def close(self) -> None:
        self.engine.close()
        self._started = False
