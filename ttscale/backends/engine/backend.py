"""`EngineBackend`: the Backend protocol over our in-process engine.

The engine steps in its own thread; this side only turns requests into token ids (chat template from the
tokenizer), registers a callback that hands outputs to the event loop, and turns outputs into Deltas.
Closing or cancelling the consumer of `generate()` aborts the request (its blocks are free after the
engine's next step).

Outputs cross threads in batches (`_Inbox`): the engine thread only appends to a deque, and the event loop
takes everything at most every `stream_interval_ms`, so hundreds of live branches cost one wake-up per
interval rather than one per token; a branch's outputs that arrived together become one multi-token Delta
(`merge_outputs`). Per-token hand-offs, each a self-pipe write plus a Delta, a Context update and a GIL
switch, were what made a 512-branch eval several times slower than the engine under it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from ttscale.backends.base import BackendBase, Capabilities
from ttscale.backends.engine.engine import Engine, RequestOutput, SamplingParams
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
    gil_switch_ms: float | None = Field(
        0.5, gt=0.0, description="GIL switch interval while the engine thread runs (None: leave Python's)")


def to_params(s: SamplingSpec, detokenize: bool = True) -> SamplingParams:
    return SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens, seed=s.seed,
        stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), logprobs=s.logprobs,
        include_stop_str=s.include_stop_str, ignore_eos=s.ignore_eos, detokenize=detokenize,
    )


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """One output carrying the tokens, text and logprobs of consecutive outputs of one request, in order."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    tops = None
    if any(o.top_logprobs for o in outs):
        tops = [t for o in outs for t in (o.top_logprobs or [{}] * len(o.token_ids))]
    return RequestOutput(
        last.request_id, [t for o in outs for t in o.token_ids], [lp for o in outs for lp in o.logprobs], tops,
        "".join(o.text for o in outs), finished=last.finished, finish_reason=last.finish_reason, error=last.error,
        prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens,
    )


class _Channel:
    """One request's outputs on the event loop side: a list plus the consumer's waiting future."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[RequestOutput] = []
        self.waiter: asyncio.Future | None = None

    def put(self, out: RequestOutput) -> None:
        self.items.append(out)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> RequestOutput:
        """Everything that arrived since the last take, merged (waits for at least one output)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        outs, self.items = self.items, []
        return merge_outputs(outs)


class _Inbox:
    """Engine-thread outputs handed to one event loop in batches (see the module docstring).

    `put` runs on the engine thread: an append to a deque, and a `call_soon_threadsafe` only when no drain
    is pending. The drain runs on the loop no sooner than `interval` after the previous one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self.loop, self.interval = loop, interval_s
        self.items: deque = deque()
        self.pending = False
        self.last = 0.0

    def put(self, ch: _Channel, out: RequestOutput) -> None:
        self.items.append((ch, out))
        if not self.pending:
            self.pending = True
            try:
                self.loop.call_soon_threadsafe(self._arm)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _arm(self) -> None:
        wait = self.last + self.interval - time.monotonic()
        if wait > 0:
            self.loop.call_later(wait, self._drain)
        else:
            self._drain()

    def _drain(self) -> None:
        self.pending = False  # before taking: a put racing with this drain schedules another one
        self.last = time.monotonic()
        items = self.items
        while items:
            ch, out = items.popleft()
            ch.put(out)


class EngineBackend(BackendBase):
    """In-process engine with shared-KV fork, abort, score and top-20 logprobs."""

    name = "engine"

    def __init__(self, config: EngineConfig | None = None, *, engine: Engine | None = None, **kw: Any) -> None:
        self.config = config or EngineConfig(**kw)
        if engine is None:
            from ttscale.backends.engine.loader import load_model, load_tokenizer

            c = self.config
            model = load_model(c.model, dtype=c.dtype, device=c.device)
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
            max_context=engine.max_context,
        )
        self._ids = itertools.count()
        self._started = False
        self._inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}

    @classmethod
    def default(cls, **kw: Any) -> EngineBackend:
        """The bundled SmolLM2-135M-Instruct on CPU or CUDA: works with no server and no download."""
        return cls(EngineConfig(model="default", **kw))

    def _start(self) -> None:
        if not self._started:
            ms = self.config.gil_switch_ms
            self.engine.start(switch_interval_s=None if ms is None else ms / 1000)
            self._started = True

    # ---- prompts ----------------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict[str, Any]], continue_final_message: bool = False) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise ConfigError("this model's tokenizer has no chat template; send `prompt` or token ids")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: str | None, messages, token_ids, continue_final_message: bool) -> list[int]:
        if token_ids is not None:
            return list(token_ids)
        if messages is not None:
            return self.chat_ids(messages, continue_final_message)
        return self.tokenizer.encode(prompt)

    # ---- protocol -----------------------------------------------------------------------------------------
    def _delta(self, out: RequestOutput) -> Delta:
        tops = None
        if out.top_logprobs:
            tops = [{self.tokenizer.decode([t]): lp for t, lp in d.items()} for d in out.top_logprobs]
        return Delta.model_construct(  # fields built here, already of the right types: no validation
            request_id=out.request_id, text=out.text, token_ids=out.token_ids, num_tokens=None,
            logprobs=out.logprobs, top_logprobs=tops, finished=out.finished, finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens, cached_prompt_tokens=out.cached_tokens, error=out.error,
        )

    def _channel(self) -> tuple[_Channel, Any]:
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            self._inboxes = {lp: ib for lp, ib in self._inboxes.items() if not lp.is_closed()}
            inbox = self._inboxes[loop] = _Inbox(loop, self.config.stream_interval_ms / 1000)
        ch = _Channel()
        return ch, (lambda out: inbox.put(ch, out))

    async def _stream(self, rid: str, ch: _Channel) -> AsyncIterator[Delta]:
        done = False
        try:
            while True:
                d = self._delta(await ch.take())
                if d.finished:
                    done = True
                yield d
                if done:
                    return
        finally:
            if not done:
                self.engine.abort(rid)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream one branch; see the module docstring for cancellation."""
        ids = self.prompt_ids(request.prompt, request.messages, request.prompt_token_ids,
                              request.continue_final_message)
        self._start()
        ch, cb = self._channel()
        self.engine.add_request(request.request_id, ids, to_params(request.sampling), cb)
        async for d in self._stream(request.request_id, ch):
            yield d

    def fork(self, request_id: str, n: int, sampling: SamplingSpec | None = None) -> list[tuple[str, AsyncIterator[Delta]]]:
        """Branch a running request into n children sharing its KV so far (copy-on-write of the last
        partial block only). Returns (child request id, delta stream) pairs; a child's deltas carry only
        tokens generated after the fork. Must be called from the event loop thread."""
        if n < 1:
            raise ConfigError(f"fork needs n >= 1 (got {n})")
        self._start()
        children, streams, cbs = [], [], []
        for _ in range(n):
            cid = f"{request_id}/fork{next(self._ids)}"
            ch, cb = self._channel()
            children.append(cid)
            cbs.append(cb)
            streams.append((cid, self._stream(cid, ch)))
        self.engine.fork(request_id, children, cbs, to_params(sampling) if sampling else None)
        return streams

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
        self.engine.score(ctx, cont, lambda res: loop.call_soon_threadsafe(fut.set_result, res))
        res = await fut
        if isinstance(res, BaseException):
            raise BackendError(f"score failed: {res}") from res
        return ScoreResult(token_ids=cont, logprobs=res)

    async def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def close(self) -> None:
        self.engine.close()
        self._started = False
