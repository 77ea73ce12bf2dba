"""`EngineBackend`: the Backend protocol over our in-process engine.

The engine steps in its own thread; this side only turns requests into token ids (chat template from the
tokenizer), registers a callback that hands outputs to an asyncio queue, and turns outputs into Deltas.
Closing or cancelling the consumer of `generate()` aborts the request (its blocks are free after the
engine's next step).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

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
    max_running: int = 256
    cuda_graphs: bool | None = None
    prefix_cache: bool = True
    fused_kernels: bool | None = None


def to_params(s: SamplingSpec, detokenize: bool = True) -> SamplingParams:
    return SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens, seed=s.seed,
        stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), logprobs=s.logprobs,
        include_stop_str=s.include_stop_str, ignore_eos=s.ignore_eos, detokenize=detokenize,
    )


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

    @classmethod
    def default(cls, **kw: Any) -> EngineBackend:
        """The bundled SmolLM2-135M-Instruct on CPU or CUDA: works with no server and no download."""
        return cls(EngineConfig(model="default", **kw))

    def _start(self) -> None:
        if not self._started:
            self.engine.start()
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
        return Delta(
            request_id=out.request_id, text=out.text, token_ids=out.token_ids, logprobs=out.logprobs,
            top_logprobs=tops, finished=out.finished, finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens, cached_prompt_tokens=out.cached_tokens, error=out.error,
        )

    def _queue(self) -> tuple[asyncio.Queue, Any]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        return q, (lambda out: loop.call_soon_threadsafe(q.put_nowait, out))

    async def _stream(self, rid: str, q: asyncio.Queue) -> AsyncIterator[Delta]:
        done = False
        try:
            while True:
                out = await q.get()
                d = self._delta(out)
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
        q, cb = self._queue()
        self.engine.add_request(request.request_id, ids, to_params(request.sampling), cb)
        async for d in self._stream(request.request_id, q):
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
            q, cb = self._queue()
            children.append(cid)
            cbs.append(cb)
            streams.append((cid, self._stream(cid, q)))
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
