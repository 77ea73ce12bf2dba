"""`solve()` is the blocking one-liner; inside a running event loop it must point to `asolve`. A backend
spec given to it is built once and kept for later calls (`ttscale.shared_backends`)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from tests.backends.standins import CountingUpstream, free_port
from ttscale import asolve, solve
from ttscale.backends import backend_spec
from ttscale.backends.scripted import ScriptedBackend
from ttscale.errors import BackendError, BackendUnavailable, ConfigError
from ttscale.shared_backends import close_shared_backends, shared_backend_specs, spec_key


def test_solve_outside_a_loop_returns_the_majority() -> None:
    backend = ScriptedBackend(["so \\boxed{4}", "so \\boxed{5}", "so \\boxed{4}"])
    result = solve("What is 2 + 2?", "self-consistency:n=3", backend)
    assert result.answer == "4"


async def test_solve_inside_a_running_loop_names_asolve() -> None:
    backend = ScriptedBackend(["\\boxed{4}"])
    with pytest.raises(ConfigError, match="asolve"):
        solve("What is 2 + 2?", "single", backend)
    assert backend.requests == []  # refused before anything ran
    result = await asolve("What is 2 + 2?", "single", backend)
    assert result.answer == "4"


# ---- backend reuse: a spec given to solve() / asolve() is built once and kept (ttscale.shared_backends)

class ProbedUpstream(CountingUpstream):
    """The counting stand-in, also counting `GET /v1/models`: one per backend that connects to it."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: Counter = Counter()

        @self.app.middleware("http")
        async def count_gets(request: Request, call_next):
            if request.method == "GET":
                self.gets[request.url.path] += 1
            return await call_next(request)

    @property
    def connects(self) -> int:
        return self.gets["/v1/models"]


@pytest.fixture
def upstreams() -> Iterator[tuple[ProbedUpstream, ProbedUpstream]]:
    with ProbedUpstream() as a, ProbedUpstream() as b:
        try:
            yield a, b
        finally:
            close_shared_backends()


def test_solve_with_a_spec_builds_the_backend_once(upstreams) -> None:
    a, _ = upstreams
    for q in ("1+6?", "2+5?", "3+4?"):
        assert solve(q, "single", f"openai:{a.url}/v1").answer == "7"
    assert a.connects == 1  # connecting probes the server once (models, then a capability probe)
    assert shared_backend_specs() == [spec_key(f"openai:{a.url}/v1")]


def test_different_specs_get_different_backends(upstreams) -> None:
    a, b = upstreams
    solve("1+6?", "single", f"openai:{a.url}/v1")
    solve("1+6?", "single", f"openai:{b.url}/v1")
    solve("1+6?", "single", f"openai:{a.url}/v1,max_retries=1")  # same server, other options: its own
    solve("1+6?", "single", f"openai:{a.url}/v1?max_retries=1")  # the same spec in the older form
    assert (a.connects, b.connects) == (2, 1)
    assert len(shared_backend_specs()) == 3


def test_a_closed_backend_is_not_reused(upstreams) -> None:
    a, _ = upstreams
    solve("1+6?", "single", f"openai:{a.url}/v1")
    close_shared_backends()
    assert shared_backend_specs() == []
    assert solve("1+6?", "single", f"openai:{a.url}/v1").answer == "7"
    assert a.connects == 2


async def test_asolve_shares_the_kept_backend_with_solve_and_runs_concurrently(upstreams) -> None:
    a, _ = upstreams
    results = await asyncio.gather(*(asolve(q, "sc:n=2", f"openai:{a.url}/v1") for q in ("1+6?", "2+5?", "3+4?")))
    assert [r.answer for r in results] == ["7", "7", "7"]
    assert a.connects == 1


def test_a_kept_backend_that_died_is_replaced(upstreams) -> None:
    """A kept backend that can serve nothing more (vLLM's in-process engine thread died: `VLLMBackend.dead`)
    is closed and built again, instead of failing every later solve() in the process."""
    from ttscale.shared_backends import SHARED

    a, _ = upstreams
    spec = f"openai:{a.url}/v1"
    solve("1+6?", "single", spec)
    (first,) = SHARED._backends.values()
    first.dead = RuntimeError("the engine thread died")  # what VLLMBackend reports then
    assert solve("1+6?", "single", spec).answer == "7"
    (second,) = SHARED._backends.values()
    assert second is not first and a.connects == 2
    assert solve("2+5?", "single", spec).answer == "7" and a.connects == 2  # the new one is kept


def test_a_backend_that_fails_to_start_is_not_kept() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises((BackendUnavailable, BackendError)):
        solve("1+6?", "single", f"openai:{url},max_retries=0")
    assert shared_backend_specs() == []


def test_a_backend_object_is_used_as_it_is_and_not_kept() -> None:
    backend = ScriptedBackend(["so \\boxed{4}"])
    assert solve("2+2?", "single", backend).answer == "4"
    assert solve("2+2?", "single", backend).answer == "4"
    assert len(backend.requests) == 2 and shared_backend_specs() == []


@pytest.mark.slow
def test_solve_on_the_engine_loads_the_model_once(monkeypatch, smollm2_dir) -> None:
    """Two solves with one engine spec load the weights once; another spec loads its own."""
    from ttscale.backends.engine import loader

    loads: list[str] = []
    real_load = loader.load_model

    def counting_load(path, *args, **kwargs):
        loads.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(loader, "load_model", counting_load)
    spec = f"engine:{smollm2_dir},dtype=float32,kv_memory_gb=0.25"
    try:
        first = solve("What is 2 + 3?", "sc:n=2,max_tokens=8", spec)
        second = solve("What is 4 + 1?", "sc:n=2,max_tokens=8", spec)
        assert len(loads) == 1
        assert first.usage.generated_tokens > 0 and second.usage.generated_tokens > 0
        solve("What is 2 + 3?", "single:max_tokens=4", f"engine:{smollm2_dir},dtype=float32,kv_memory_gb=0.2")
        assert len(loads) == 2 and len(shared_backend_specs()) == 2
    finally:
        close_shared_backends()


@settings(max_examples=60, deadline=None)
@given(path=st.from_regex(r"/[a-z0-9_]{1,12}", fullmatch=True),
       options=st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True),
                               st.one_of(st.integers(0, 10**6), st.booleans(),
                                         st.text(alphabet="abc ,/=", min_size=1, max_size=8)), max_size=4),
       order=st.randoms(use_true_random=False))
def test_spec_key_ignores_option_order_and_is_stable(path: str, options: dict, order) -> None:
    shuffled = list(options.items())
    order.shuffle(shuffled)
    key = spec_key(backend_spec("engine", path, **options))
    assert key == spec_key(backend_spec("engine", path, **dict(shuffled)))
    assert spec_key(key) == key
    assert key != spec_key(backend_spec("engine", path + "x", **options))


def test_a_choice_problem_shows_its_options_and_grades_a_text_answer():
    from ttscale.backends.scripted import ScriptedBackend

    b = ScriptedBackend(["The answer is B"])
    r = solve({"prompt": "Which gas do plants take in?", "answer": "Carbon dioxide", "kind": "choice",
               "choices": ["Oxygen", "Carbon dioxide"]}, "single", b)
    assert b.requests[0].messages[-1]["content"].endswith("A) Oxygen\nB) Carbon dioxide")
    assert r.answer == "B" and r.correct is True


def test_a_problem_dict_takes_a_number_answer_and_names_a_bad_field():
    from ttscale.backends.scripted import ScriptedBackend
    from ttscale.errors import ConfigError

    assert solve({"prompt": "6 * 7?", "answer": 42}, "single", ScriptedBackend(["The answer is 42"])).correct
    with pytest.raises(ConfigError, match="answr"):
        solve({"prompt": "6 * 7?", "answr": 42}, "single", ScriptedBackend(["x"]))
