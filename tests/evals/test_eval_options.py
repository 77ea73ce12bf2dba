"""Eval and run options of issue 16: system prompts (default / none / text, per dataset), "did you mean",
per-problem timeouts and failures mid-run, and the live progress estimate.

The runner tests use real SQLite and the scripted backend (the subject is the harness, not a model); the
system-prompt CLI tests run `ttscale` as a real process against the stand-in OpenAI-compatible HTTP server
and read what it received.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from tests.backends.standins import ThreadedServer, openai_app
from tests.reliability.eval_standin import EvalUpstream, env, eval_cmd, run_eval, stored_rows, write_dataset
from ttscale.backends.base import WrappingBackend
from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.errors import ConfigError, UnknownNameError
from ttscale.evals.datasets import Dataset, load_dataset
from ttscale.evals.runner import TokenMeter, eta_seconds, evaluate, format_eta, make_progress
from ttscale.evals.store import ResultStore
from ttscale.pipeline import Pipeline
from ttscale.prompts import (
    CHOICE_SYSTEM,
    DEFAULT_SYSTEM_PROMPT,
    MATH_SYSTEM,
    resolve_system_prompt,
    system_prompt_choice,
    system_prompt_for,
)
from ttscale.strategies.registry import make_strategy
from ttscale.strategies.single import SingleSample
from ttscale.types import Event, GenerationRequest, Problem

TTSCALE = [sys.executable, "-m", "ttscale.cli"]


def problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"Problem p{i}: what is {i} + 1?", answer=str(i + 1)) for i in range(n)]


def problem_of(request: GenerationRequest) -> str:
    text = json.dumps(request.messages)
    return text.split("Problem ", 1)[1].split(":", 1)[0]


def right_answer(request: GenerationRequest, i: int) -> Script:
    pid = problem_of(request)
    return Script(text=f"so it is \\boxed{{{int(pid[1:]) + 1}}}")


def system_of(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "system"), None)


# ------------------------------------------------------------------------------------------ system prompts


@given(st.text(max_size=40), st.sampled_from(["math", "choice", "free"]))
def test_a_system_prompt_setting_resolves_to_its_text_none_or_the_kind_default(text, kind):
    assert resolve_system_prompt(DEFAULT_SYSTEM_PROMPT, kind) == system_prompt_for(kind)
    assert resolve_system_prompt(None, kind) is None
    if text != DEFAULT_SYSTEM_PROMPT:
        assert resolve_system_prompt(text, kind) == (text or None)


def test_cli_flags_choose_default_none_or_text_and_refuse_both():
    assert system_prompt_choice(None, False) == DEFAULT_SYSTEM_PROMPT
    assert system_prompt_choice(None, True) is None
    assert system_prompt_choice("Answer tersely.", False) == "Answer tersely."
    with pytest.raises(ConfigError, match="not both"):
        system_prompt_choice("x", True)


@pytest.mark.parametrize("spec", ["single", "self-consistency:n=2", "ffs:n=2", "pdr:schedule=[2,1]",
                                  "parathinker:mode=text,paths=2"])
@pytest.mark.parametrize("choice", [DEFAULT_SYSTEM_PROMPT, None, "You are terse."])
async def test_every_strategy_sends_the_chosen_system_prompt(spec, choice):
    backend = ScriptedBackend(right_answer)
    async with Pipeline(backend, spec, system_prompt=choice, seed=0) as pipe:
        result = await pipe.solve(problems(3)[2])
    assert result.error is None and backend.requests
    expected = MATH_SYSTEM if choice == DEFAULT_SYSTEM_PROMPT else choice
    for request in backend.requests:
        content = str(request.messages[-1]["content"])
        if "Attempt 1:" in content:  # ParaThinker's summary: only a prompt the user gave
            assert system_of(request.messages) == (None if choice == DEFAULT_SYSTEM_PROMPT else choice)
        elif "Write a short summary" in content:  # PDR's distill call writes a summary: no system prompt
            assert system_of(request.messages) is None
        else:
            assert system_of(request.messages) == expected, (spec, request.messages)


def test_hogwild_adds_only_a_given_system_prompt_to_its_collaboration_prompt():
    class NoTemplate:
        chat_template = None

    problem = problems(1)[0]
    prompts = {}
    for choice in (DEFAULT_SYSTEM_PROMPT, None, "Think in French."):
        strat = make_strategy("hogwild:workers=2").with_system_prompt(choice)
        prompts[choice] = "\n".join(m["content"] for m in strat.prompt_messages(problem, NoTemplate()))
    assert prompts[DEFAULT_SYSTEM_PROMPT] == prompts[None] and "step by step" not in prompts[None]
    assert "Think in French." in prompts["Think in French."] and "Think in French." not in prompts[None]


def test_spec_strings_carry_no_system_prompt_and_round_trip():
    s = make_strategy("single:system_prompt=null")
    assert s.config.system_prompt is None and s.messages(problems(1)[0])[0]["role"] == "user"
    assert make_strategy(s.spec).config.system_prompt is None
    assert make_strategy("single").config.system_prompt == DEFAULT_SYSTEM_PROMPT


async def test_a_dataset_default_applies_only_where_the_strategy_is_left_at_default(tmp_path):
    choice_problem = Problem(id="c0", prompt="Problem c0: pick", answer="A", kind="choice", choices=["x", "y"])
    ds = Dataset("mine", [*problems(2), choice_problem], "test", system_prompt="Use the house style.")
    backend = ScriptedBackend(lambda r, i: Script(text="\\boxed{A}"))
    with ResultStore(tmp_path / "r.db") as store:
        outs = await evaluate(ds, ["single", "single:system_prompt=Mine.", "single:system_prompt=null"], backend,
                              store, backend_spec="scripted", concurrency=1)
        configs = [store.run(o.run.run_id).config["config"]["system_prompt"] for o in outs]
    assert configs == ["Use the house style.", "Mine.", None]  # the prompt used is part of the run config
    sent = [system_of(r.messages) for r in backend.requests]
    assert sent == ["Use the house style."] * 3 + ["Mine."] * 3 + [None] * 3
    gpqa_like = Dataset("gpqa-diamond", [choice_problem], "test")
    backend = ScriptedBackend(lambda r, i: Script(text="\\boxed{A}"))
    with ResultStore(tmp_path / "g.db") as store:
        (out,) = await evaluate(gpqa_like, ["single"], backend, store, backend_spec="scripted")
        assert store.run(out.run.run_id).config["config"]["system_prompt"] == CHOICE_SYSTEM
    assert load_dataset("smoke").head(2).system_prompt == DEFAULT_SYSTEM_PROMPT


@pytest.fixture
def recording_upstream():
    with ThreadedServer(openai_app(delay_s=0.0), name="system-prompt-upstream", lifespan="off") as server:
        yield server


@pytest.mark.parametrize("flags, expected", [([], MATH_SYSTEM), (["--no-system-prompt"], None),
                                             (["--system-prompt", "Reply in one line."], "Reply in one line.")])
def test_eval_and_run_send_the_system_prompt_the_flags_choose(recording_upstream, tmp_path, flags, expected):
    spec = f"openai:{recording_upstream.url}?model=standin&detect=false&max_retries=0"
    data = write_dataset(tmp_path / "sums.jsonl", 2)
    ran = run_eval([*TTSCALE, "eval", "--dataset", str(data), "--db", str(tmp_path / "r.db"), "--backend", spec,
                    "--strategy", "single", "--max-tokens", "4", "--no-progress", *flags])
    assert ran.returncode == 0, ran.stderr
    one = subprocess.run([*TTSCALE, "run", "Problem p9: what is 1 + 1?", "--backend", spec, "--strategy", "single",
                          "--max-tokens", "4", *flags], check=False, capture_output=True, text=True, env=env(),
                         timeout=120)
    assert one.returncode in (0, 1), one.stderr  # answered (the stand-in's words are no boxed answer: 0 or 1)
    bodies = recording_upstream.app.state.bodies
    assert len(bodies) == 3
    assert [system_of(b["messages"]) for b in bodies] == [expected] * 3


def test_both_system_prompt_flags_is_bad_input(tmp_path):
    proc = run_eval([*TTSCALE, "eval", "--dataset", "smoke", "--db", str(tmp_path / "r.db"), "--system-prompt",
                     "x", "--no-system-prompt"])
    assert proc.returncode == 2 and "not both" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags,named", [(["--budget-tokens", "0"], "--budget-tokens"),
                                         (["--deadline", "-1"], "--deadline"), (["-c", "0"], "--concurrency")])
def test_non_positive_limits_are_bad_input_naming_the_flag(tmp_path, flags, named):
    proc = run_eval([*TTSCALE, "eval", "--dataset", "smoke", "--db", str(tmp_path / "r.db"), "--no-progress", *flags])
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    one = run_eval([*TTSCALE, "run", "1 + 1?", "--backend", "openai:http://127.0.0.1:9/v1", "--budget-tokens", "0"])
    assert one.returncode == 2 and "--budget-tokens must be > 0" in one.stderr, one.stderr


# ------------------------------------------------------------------------------------------ did you mean


def test_misspelt_names_get_suggestions():
    with pytest.raises(UnknownNameError, match=r"did you mean 'self-consistency'\?"):
        make_strategy("self-consistncy")
    from ttscale.backends import make_backend

    with pytest.raises(UnknownNameError, match=r"did you mean 'vllm'\?"):
        make_backend("vlm")
    with pytest.raises(UnknownNameError, match=r"did you mean 'aime24'"):
        load_dataset("aime-24")
    with pytest.raises(UnknownNameError) as nothing_close:
        make_strategy("zzzzzz")
    assert "did you mean" not in str(nothing_close.value) and nothing_close.value.suggestions == []


def test_the_cli_suggests_the_strategy_meant(tmp_path):
    proc = run_eval([*TTSCALE, "eval", "--dataset", "smoke", "--db", str(tmp_path / "r.db"), "--strategy",
                     "self-consistncy:n=2", "--no-progress"])
    assert proc.returncode == 2 and "did you mean 'self-consistency'?" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------- timeouts and failures


def slow_for(pid: str, delay_s: float):
    def script(request: GenerationRequest, i: int) -> Script:
        s = right_answer(request, i)
        return s.model_copy(update={"delay_s": delay_s if problem_of(request) == pid else 0.0})
    return script


async def test_a_problem_past_its_timeout_is_an_error_its_branches_stop_and_the_run_goes_on(tmp_path):
    ds = Dataset("t", problems(4), "test")
    backend = ScriptedBackend(slow_for("p1", 30.0))
    with ResultStore(tmp_path / "r.db") as store:
        (out,) = await evaluate(ds, ["self-consistency:n=2"], backend, store, backend_spec="scripted",
                                concurrency=2, problem_timeout_s=0.5)
        rows = {r.problem_id: r for r in store.rows(out.run.run_id)}
        status = store.run(out.run.run_id).status
    assert (out.solved, out.errors, status) == (3, 1, "error")
    assert rows["p1"].failed and "ProblemTimeout" in rows["p1"].error and "--problem-timeout" in rows["p1"].error
    assert all(rows[p].correct for p in ("p0", "p2", "p3"))
    slow = {r.request_id for r in backend.requests if problem_of(r) == "p1"}
    assert len(slow) == 2 and slow <= set(backend.aborted)  # both of its branches were stopped on the backend
    assert not slow & set(backend.completed)


class RaisesMidStream(WrappingBackend):
    """Streams normally, except that problem `pid`'s streams raise after their second token."""

    def __init__(self, inner, pid: str) -> None:
        super().__init__(inner)
        self.pid = pid

    async def generate(self, request: GenerationRequest):
        sent = 0
        async for d in self.inner.generate(request):
            if problem_of(request) == self.pid and sent == 2:
                raise RuntimeError(f"connection reset while streaming {self.pid}")
            sent += 1
            yield d


class RaisingStrategy(SingleSample):
    """A strategy whose own code raises (e.g. a judge's bug) on one problem, after its branch started."""

    name = "raising-single"

    async def run(self, problem, ctx):
        if problem.id == "p2":
            (b,) = ctx.spawn(self.messages(problem), 1, self.config.sampling())
            await ctx.first_finished([b], 1)
            raise ValueError("judge crashed on p2")
        return await super().run(problem, ctx)


@pytest.mark.parametrize("how", ["backend", "strategy"])
async def test_a_problem_that_raises_mid_run_is_an_error_and_the_run_continues(tmp_path, how):
    ds = Dataset("t", problems(5), "test")
    scripted = ScriptedBackend(right_answer)
    backend = RaisesMidStream(scripted, "p2") if how == "backend" else scripted
    strategy = "single" if how == "backend" else RaisingStrategy()
    with ResultStore(tmp_path / "r.db") as store:
        (out,) = await evaluate(ds, [strategy], backend, store, backend_spec="scripted", concurrency=1)
        rows = {r.problem_id: r for r in store.rows(out.run.run_id)}
    assert (out.solved, out.errors, out.stopped_on_failures) == (4, 1, False)
    reason = "connection reset while streaming p2" if how == "backend" else "ValueError: judge crashed on p2"
    assert rows["p2"].failed and reason in rows["p2"].error
    assert [p for p, r in rows.items() if not r.failed] == ["p0", "p1", "p3", "p4"]


async def test_max_failures_counts_timeouts_and_stops_the_run(tmp_path):
    ds = Dataset("t", problems(6), "test")
    backend = ScriptedBackend(lambda r, i: right_answer(r, i).model_copy(update={"delay_s": 30.0}))
    with ResultStore(tmp_path / "r.db") as store:
        (out,) = await evaluate(ds, ["single"], backend, store, backend_spec="scripted", concurrency=1,
                                problem_timeout_s=0.2, max_failures=2)
        assert store.count(out.run.run_id) == 2 and store.count(out.run.run_id, "error") == 2
    assert out.stopped_on_failures and out.errors == 2


def test_problem_timeout_from_the_cli_stores_errors_and_stops_at_max_failures(tmp_path):
    data = write_dataset(tmp_path / "sums.jsonl", 5)
    db = tmp_path / "r.db"
    with EvalUpstream(delay_s=2.0) as upstream:  # every problem takes longer than its timeout
        proc = run_eval(eval_cmd(data, db, upstream.spec, "--problem-timeout", "0.3", "--max-failures", "2",
                                 concurrency=1))
    assert proc.returncode == 1 and "--max-failures 2" in proc.stderr and "Traceback" not in proc.stderr
    assert [r[5] for r in stored_rows(db)] == ["error", "error"]
    with ResultStore(db) as store:
        (run,) = store.runs()
        assert all("no result within 0.3s" in r.error for r in store.rows(run.run_id))
    bad = run_eval(eval_cmd(data, db, "engine", "--problem-timeout", "0"))
    assert bad.returncode == 2 and "--problem-timeout must be > 0" in bad.stderr


# ------------------------------------------------------------------------------------------ live progress


@given(st.integers(0, 50), st.lists(st.integers(0, 5000), max_size=8), st.floats(1, 1e4), st.floats(0.1, 1e4))
def test_eta_is_what_the_unfinished_problems_still_need_over_the_rate(not_started, running, per_problem, rate):
    eta = eta_seconds(not_started=not_started, running_tokens=running, tokens_per_problem=per_problem,
                      token_rate=rate)
    assert eta is not None and eta >= 0
    more = eta_seconds(not_started=not_started + 1, running_tokens=running, tokens_per_problem=per_problem,
                       token_rate=rate)
    assert more > eta  # one more problem to go: later
    if running:
        further = [running[0] + 10, *running[1:]]
        assert eta_seconds(not_started=not_started, running_tokens=further, tokens_per_problem=per_problem,
                           token_rate=rate) <= eta  # a running problem got further: not later
    assert eta_seconds(not_started=not_started, running_tokens=running, tokens_per_problem=per_problem,
                       token_rate=rate * 2) == pytest.approx(eta / 2)


def test_eta_is_unknown_without_a_rate_or_a_cost_and_zero_when_done():
    assert eta_seconds(not_started=0, running_tokens=[], tokens_per_problem=None, token_rate=0) == 0
    assert eta_seconds(not_started=3, running_tokens=[], tokens_per_problem=None, token_rate=5) is None
    assert eta_seconds(not_started=3, running_tokens=[1], tokens_per_problem=10, token_rate=0) is None
    assert format_eta(None) == "-:--:--" and format_eta(3725.4) == "1:02:05"


def test_token_meter_rate_covers_the_recent_window():
    meter = TokenMeter(window_s=10)
    t0 = meter._samples[0][0]
    meter(Event(kind="delta", n_tokens=100))
    meter(Event(kind="finished", n_tokens=7))  # only deltas are generated tokens
    assert meter.rate(t0 + 10) == pytest.approx(10)
    meter.rate(t0 + 20)  # nothing new for 10 s
    meter(Event(kind="delta", n_tokens=50))
    assert meter.rate(t0 + 30) == pytest.approx(50 / 10)  # the last 10 s only: the old burst has left


async def test_tokens_per_second_and_eta_move_while_a_problem_runs(tmp_path):
    """One slow problem (a token every 50 ms): the bar's tok/s and ETA change before it finishes."""
    ds = Dataset("t", problems(2), "test")
    words = " ".join(["step"] * 60)
    backend = ScriptedBackend(lambda r, i: Script(text=f"{words} \\boxed{{1}}", delay_s=0.05))
    progress = make_progress(Console(file=io.StringIO(), width=200))
    seen: list[tuple[str, str]] = []
    with ResultStore(tmp_path / "r.db") as store:
        run = asyncio.create_task(evaluate(ds, ["single:max_tokens=100"], backend, store, backend_spec="scripted",
                                           concurrency=1, progress=progress))
        while not run.done():
            await asyncio.sleep(0.1)  # sampling what the bar shows, as a user watching it would
            task = progress.tasks[0] if progress.tasks else None
            if task is not None and task.completed == 0:
                seen.append((task.fields["tps"], task.fields["eta"]))
        await run
    during = [s for s in seen if s[0] != "0"]
    assert during, seen
    assert all(tps.isdigit() and int(tps) > 0 for tps, _ in during)
    etas = {eta for _, eta in during}
    assert "-:--:--" not in etas and len(etas) >= 2, seen  # an estimate, and it moves
    assert progress.tasks[0].fields["eta"] == "0:00:00" or progress.tasks[0].completed == 2
