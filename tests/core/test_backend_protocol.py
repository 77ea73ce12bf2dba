"""The Backend protocol: `start` in it, optional parts announced by capabilities (never found with getattr),
wrappers that forward them faithfully, and strategies typed by their config."""

from __future__ import annotations

import inspect
import typing

import pytest

from ttscale import Pipeline
from ttscale.backends.base import Backend, BackendBase, Capabilities, WrappingBackend, engine_parts
from ttscale.backends.openai import OpenAIBackend
from ttscale.backends.scripted import ScriptedBackend
from ttscale.backends.sglang import SGLangBackend
from ttscale.controller import Context
from ttscale.errors import CapabilityError
from ttscale.evals.bank import RecordingBackend, TraceBank
from ttscale.evals.replay import ReplayBackend
from ttscale.evals.runner import ScopedIds
from ttscale.server.forwarding import ForwardedParams
from ttscale.strategies.base import Strategy
from ttscale.strategies.registry import strategies
from ttscale.types import SamplingSpec

PROTOCOL = ("name", "capabilities", "start", "generate", "abort", "score", "tokenize", "fork", "chat_ids",
            "run_native", "close")
ASYNC_PARTS = ("start", "abort", "score", "tokenize", "close")

ALL_CLOSED = ("shared_kv_fork", "concurrent_views", "engine_native", "chat_ids")


def backend_classes() -> list[type]:
    from ttscale.backends.engine.backend import EngineBackend
    from ttscale.backends.engine.parscale_model import ParScaleBackend
    from ttscale.backends.vllm import VLLMBackend

    return [ScriptedBackend, EngineBackend, ParScaleBackend, VLLMBackend, OpenAIBackend, SGLangBackend,
            ReplayBackend, WrappingBackend, RecordingBackend, ScopedIds, ForwardedParams]


@pytest.mark.parametrize("cls", backend_classes(), ids=lambda c: c.__name__)
def test_every_backend_implements_the_whole_protocol(cls: type) -> None:
    missing = [p for p in PROTOCOL if not hasattr(cls, p)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    for part in ASYNC_PARTS:
        assert inspect.iscoroutinefunction(getattr(cls, part)), f"{cls.__name__}.{part} is not async"


def test_a_backend_without_start_is_not_a_backend() -> None:
    class NoStart:
        name = "no-start"
        capabilities = Capabilities()

    for part in PROTOCOL[2:]:
        if part != "start":
            setattr(NoStart, part, getattr(BackendBase, part, lambda self, *a, **k: None))
    assert not isinstance(NoStart(), Backend)
    NoStart.start = BackendBase.start  # type: ignore[attr-defined]
    assert isinstance(NoStart(), Backend) and isinstance(ScriptedBackend(["a"]), Backend)


async def test_optional_parts_refuse_by_name_when_the_capability_is_absent() -> None:
    be = ScriptedBackend(["a"])
    assert be.capabilities.missing("shared_kv_fork", "chat_ids", "concurrent_views", "engine_native") == [
        "shared_kv_fork", "chat_ids", "concurrent_views", "engine_native"]
    with pytest.raises(CapabilityError, match="'scripted' cannot fork"):
        be.fork("r1", 2)
    with pytest.raises(CapabilityError, match="'scripted' does not render chats"):
        be.chat_ids([{"role": "user", "content": "hi"}])
    with pytest.raises(CapabilityError, match="'scripted' cannot run native jobs"):
        be.run_native("r1", job=None)  # type: ignore[arg-type]
    with pytest.raises(CapabilityError, match="hogwild needs the engine backend.*'scripted'.*engine_native"):
        engine_parts(be, "hogwild")


async def test_hogwild_on_a_backend_without_views_fails_at_its_check() -> None:
    from ttscale.strategies.registry import make_strategy

    with pytest.raises(CapabilityError, match="concurrent_views"):
        await Pipeline(ScriptedBackend(["a"]), make_strategy("hogwild")).solve("1+1?")


class StartsLate(ScriptedBackend):
    """A scripted backend whose capabilities are known only after `start` (like an HTTP backend's)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.starts = 0
        self.capabilities = Capabilities()

    async def start(self) -> StartsLate:
        self.starts += 1
        self.capabilities = Capabilities(abort=True, token_ids=True, tokenize=True, max_context=77)
        return self


async def test_a_wrapper_starts_its_inner_and_reads_its_capabilities_after() -> None:
    inner = StartsLate(["so \\boxed{4}"])
    wrapper = WrappingBackend(inner)
    assert wrapper.capabilities.max_context is None
    assert await wrapper.start() is wrapper
    assert inner.starts == 1 and wrapper.capabilities == inner.capabilities
    assert wrapper.capabilities.max_context == 77


async def test_a_pipeline_starts_its_backend_once_over_many_problems() -> None:
    inner = StartsLate(["so \\boxed{4}"])
    pipe = Pipeline(inner, "single")
    results = await pipe.run(["2+2?", "1+3?", "0+4?"])
    await pipe.solve("4+0?")
    assert [r.answer for r in results] == ["4", "4", "4"] and inner.starts == 1


async def test_withheld_capabilities_read_false_and_their_parts_refuse(tmp_path) -> None:
    inner = ScriptedBackend(["a b c"])
    inner.capabilities = inner.capabilities.model_copy(update=dict.fromkeys(ALL_CLOSED, True))
    recorder = RecordingBackend(inner, TraceBank(tmp_path / "bank.sqlite", create=True))
    caps = recorder.capabilities
    assert not caps.shared_kv_fork and not caps.concurrent_views and not caps.engine_native
    assert caps.chat_ids and caps.abort and caps.top_logprobs == 20  # the rest come through as they are
    assert WrappingBackend(inner).capabilities == inner.capabilities
    with pytest.raises(CapabilityError, match="cannot fork"):
        recorder.fork("r1", 2)
    with pytest.raises(CapabilityError, match="engine_native"):
        engine_parts(recorder, "hogwild")


async def test_a_context_forks_through_a_recorder_by_re_prefilling(tmp_path) -> None:
    """The recorder withholds shared-KV fork, so the children go through its `generate` (and get recorded)."""
    inner = ScriptedBackend(["w " * 40, "x y", "x y"], yield_every=1)
    inner.capabilities = inner.capabilities.model_copy(update={"shared_kv_fork": True})
    recorder = RecordingBackend(inner, TraceBank(tmp_path / "bank.sqlite", create=True))
    async with Context(recorder) as ctx:
        (parent,) = ctx.spawn("q", 1, SamplingSpec(max_tokens=100))
        async for _ in ctx.watch([parent]):
            if parent.num_tokens >= 3:
                break
        kids = ctx.fork(parent, 2)
        await ctx.wait_all(kids)
    assert [k.meta["fork"] for k in kids] == ["re-prefill", "re-prefill"]
    assert len(inner.requests) == 3


def _declared_config(cls: type) -> type | None:
    """The X of the nearest `Strategy[X]` (or generic subclass) a strategy class declares."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            origin = typing.get_origin(base)
            if not (args and isinstance(origin, type) and issubclass(origin, Strategy)):
                continue
            arg = args[0]
            if not isinstance(arg, type):  # a type variable: its default (a generic strategy used as is)
                arg = getattr(arg, "__default__", None)
            if isinstance(arg, type):
                return arg
    return None


@pytest.mark.parametrize("name", sorted(strategies()))
def test_every_strategy_declares_the_config_type_it_builds(name: str) -> None:
    cls = strategies()[name]
    declared = _declared_config(cls)
    assert declared is not None, f"{cls.__name__} is not declared as Strategy[ItsConfig]"
    assert issubclass(cls.Config, declared), (cls.__name__, cls.Config, declared)
    assert isinstance(cls().config, declared)


def test_backend_base_defaults_start_to_itself() -> None:
    import asyncio

    be = BackendBase()
    assert asyncio.run(be.start()) is be


# ---- on the real engine (bundled SmolLM2, CPU)


async def _fork_after(ctx: Context, tokens: int, n: int):
    (parent,) = ctx.spawn("Name three primary colours.", 1, SamplingSpec(temperature=0.0, max_tokens=24))
    async for _ in ctx.watch([parent]):
        if parent.num_tokens >= tokens:
            break
    kids = ctx.fork(parent, n)
    await ctx.wait_all([parent, *kids])
    return parent, kids


@pytest.mark.slow
async def test_the_engine_announces_its_optional_parts_and_starts_once(smollm2_backend) -> None:
    be = smollm2_backend
    caps = be.capabilities
    assert caps.shared_kv_fork and caps.concurrent_views and caps.chat_ids and caps.engine_native
    assert await be.start() is be
    thread = be.engine._thread
    await be.start()
    assert thread is not None and be.engine._thread is thread  # idempotent: the same step thread
    native = engine_parts(be, "hogwild")
    assert native.engine is be.engine and native.tokenizer is be.tokenizer
    ids = be.chat_ids([{"role": "user", "content": "hi"}])
    assert be.tokenizer.decode(ids).rstrip().endswith("assistant")


@pytest.mark.slow
async def test_forks_through_wrappers_share_kv_or_re_prefill_as_announced(smollm2_backend, tmp_path) -> None:
    from ttscale.evals.runner import _SCOPE

    async with Context(WrappingBackend(smollm2_backend)) as ctx:
        _, kids = await _fork_after(ctx, 4, 2)
    assert [k.meta["fork"] for k in kids] == ["shared_kv", "shared_kv"]
    assert engine_parts(WrappingBackend(smollm2_backend), "hogwild").engine is smollm2_backend.engine

    token = _SCOPE.set("problem-7")  # the eval runner's scoped request ids: the fork must find its parent
    try:
        async with Context(ScopedIds(smollm2_backend)) as ctx:
            _, kids = await _fork_after(ctx, 4, 2)
    finally:
        _SCOPE.reset(token)
    assert all(k.meta["fork"] == "shared_kv" and k.error is None and k.num_tokens > 0 for k in kids)

    recorder = RecordingBackend(smollm2_backend, TraceBank(tmp_path / "bank.sqlite", create=True))
    async with Context(recorder) as ctx:
        _, kids = await _fork_after(ctx, 4, 1)
    assert kids[0].meta["fork"] == "re-prefill" and kids[0].num_tokens > 0
