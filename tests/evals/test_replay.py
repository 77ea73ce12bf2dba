"""Trace bank + replay: a replayed strategy takes exactly the live run's decisions and token counts.

The live runs that record the banks use a real in-process vLLM (tiny random-weight model, the shared
session fixture) and, for the fast mechanics tests, the scripted model.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.evals import record_bank
from ttscale.evals.bank import RecordingBackend, TraceBank
from ttscale.evals.datasets import load_dataset
from ttscale.evals.replay import ReplayBackend
from ttscale.evals.runner import evaluate
from ttscale.evals.store import ResultStore
from ttscale.pipeline import Pipeline

FIDELITY = [
    "self-consistency:n=4",
    "ffs:n=4",
    "short-m:k=5,m=2",
    "deepprune:n=6,judge=lexical,prefix_tokens=2,k2=2,k3=2",
]


def _fingerprint(result):
    u = result.usage
    return {
        "answer": result.answer, "decision": result.decision, "generated": u.generated_tokens,
        "sequential": u.sequential_tokens, "saved": u.saved_tokens, "aborted": u.aborted, "branches": u.branches,
        "traces": [(t.id, t.status.value, t.num_tokens, t.finish_order, t.answer, t.token_ids)
                   for t in t_sorted(result)],
    }


def t_sorted(result):
    return sorted(result.traces, key=lambda t: t.id)


async def _replay_rows(bank_path, dataset, strategy, db, **opts):
    backend = ReplayBackend(bank_path, **opts)
    store = ResultStore(db)
    out = await evaluate(dataset, [strategy], backend, store, backend_spec="replay", concurrency=3)
    await backend.close()
    return {r.problem_id: r.result for r in store.rows(out[0].run.run_id)}, backend


@pytest.mark.parametrize("strategy", FIDELITY)
async def test_replay_reproduces_scripted_live_run(tmp_path, strategy):
    ds = load_dataset("chain-sum", limit=6, seed=0)
    bank, store, run_id = await record_bank(tmp_path / "bank.db", ds, strategy, tmp_path / "live.db")
    live = {r.problem_id: r.result for r in store.rows(run_id)}
    replayed, _ = await _replay_rows(bank.path, ds, strategy, tmp_path / "replay.db")
    assert set(live) == set(replayed) == {p.id for p in ds.problems}
    for pid, result in live.items():
        assert _fingerprint(replayed[pid]) == _fingerprint(result), pid
    if strategy.startswith(("ffs", "short-m", "deepprune")):
        assert sum(r.usage.aborted for r in live.values()) > 0  # the test exercises aborted branches


@pytest.mark.vllm
@pytest.mark.parametrize("strategy", [
    "self-consistency:n=4,max_tokens=24",
    "ffs:n=4,max_tokens=24,stop=[\"a\"]",
    "deepprune:n=6,judge=lexical,prefix_tokens=2,k2=2,k3=2,max_tokens=24",
])
async def test_replay_reproduces_real_vllm_run(tmp_path, vllm_backend, strategy):
    ds = load_dataset("smoke", limit=4)
    bank = TraceBank(tmp_path / "bank.db", create=True)
    bank.set_meta(bank_id="vllm", backend="vllm:tiny")
    rec = RecordingBackend(vllm_backend, bank)
    store = ResultStore(tmp_path / "live.db")
    out = await evaluate(ds, [strategy], rec, store, backend_spec="vllm:tiny", concurrency=2, recorder=rec)
    await rec._gate.aclose()
    live = {r.problem_id: r.result for r in store.rows(out[0].run.run_id)}
    replayed, _ = await _replay_rows(bank.path, ds, strategy, tmp_path / "replay.db")
    for pid, result in live.items():
        assert _fingerprint(replayed[pid]) == _fingerprint(result), pid
    if not strategy.startswith("self-consistency"):
        assert sum(r.usage.aborted for r in live.values()) > 0  # aborted branches are part of what must match
    traces = bank.traces(ds.problems[0].id)
    assert traces and all(t.token_ids and len(t.logprobs) == t.num_tokens == len(t.token_times) for t in traces
                          if t.status == "finished")


async def test_bank_jsonl_and_sweep_over_n_and_budget(tmp_path):
    ds = load_dataset("chain-sum", limit=4, seed=1)
    await record_bank(tmp_path / "bank.jsonl", ds, "self-consistency:n=8", tmp_path / "live.db")
    assert TraceBank(tmp_path / "bank.jsonl").meta["bank_id"] == "bank"
    traces = TraceBank(tmp_path / "bank.jsonl").traces(ds.problems[0].id)
    assert len(traces) == 8 and all(t.status == "finished" for t in traces)
    # self-consistency with n=4 replays the first 4 recorded traces of each problem
    backend = ReplayBackend(tmp_path / "bank.jsonl")
    pipe = Pipeline(backend, "self-consistency:n=4", seed=0)
    from ttscale.evals.bank import CURRENT_PROBLEM

    p = ds.problems[0]
    CURRENT_PROBLEM.set(p.id)
    r = await pipe.solve(p)
    assert [t.text for t in t_sorted(r)] == [t.text for t in traces[:4]]
    # a per-branch limit below the recorded length cuts the trace with finish reason "length"
    backend.reset()
    short = await Pipeline(backend, "self-consistency:n=2,max_tokens=3", seed=0).solve(p)
    assert [t.num_tokens for t in short.traces] == [3, 3]
    assert {t.finish_reason for t in short.traces} == {"length"}
    # asking for more traces than were recorded is a clear error: the branch fails, and the backend says why
    # (an eval stores the problem as an error: test_a_request_the_bank_cannot_serve_is_a_problem_error)
    backend.reset()
    many = await Pipeline(backend, "self-consistency:n=9", seed=0).solve(p)
    failed = [t for t in many.traces if t.status.value == "failed"]
    assert len(failed) == 1 and "has 8 traces" in str(failed[0].meta.get("exception"))
    assert "has 8 traces" in str(backend.refusal(p.id))
    backend.reset()
    assert backend.refusal(p.id) is None
    CURRENT_PROBLEM.set(None)
    await backend.close()


async def test_aborted_trace_cannot_be_run_past_its_recording(tmp_path):
    ds = load_dataset("chain-sum", limit=2, seed=2)
    bank, _, _ = await record_bank(tmp_path / "bank.db", ds, "ffs:n=4", tmp_path / "live.db")
    rows, _ = await _replay_rows(bank.path, ds, "self-consistency:n=4", tmp_path / "replay.db")
    # FFS aborted the losers when recording; self-consistency needs them whole: each problem is an error
    assert all(r.answer is None and "ReplayRefused" in r.error and "aborted after" in r.error for r in rows.values())


async def test_real_clock_replays_recorded_timing(tmp_path):
    ds = load_dataset("chain-sum", limit=2, seed=3)
    bank, store, run_id = await record_bank(tmp_path / "bank.db", ds, "self-consistency:n=3",
                                            tmp_path / "live.db", delay_s=0.01)
    live = {r.problem_id: r for r in store.rows(run_id)}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rows, _ = await _replay_rows(bank.path, ds, "self-consistency:n=3", tmp_path / "replay.db", clock="real",
                                 speed=2.0)
    took = loop.time() - t0
    slowest = max(r.wall_time_s for r in live.values())
    assert took >= slowest / 2 * 0.8  # recorded gaps are replayed (at 2x speed), not skipped
    assert {k: v.answer for k, v in rows.items()} == {k: v.answer for k, v in live.items()}


def test_sim_clock_serves_a_second_event_loop():
    """A clock whose driver belonged to a closed loop starts over on the next one and still releases the
    first event it is asked for there."""
    import asyncio

    from ttscale.evals.replay import SimClock

    clock = SimClock()

    async def tick(t: float) -> float:
        await asyncio.wait_for(clock.sleep_until(t), 5)
        return clock.time()

    assert asyncio.run(tick(1.0)) == 1.0
    assert asyncio.run(tick(2.0)) == 2.0


async def test_replay_records_the_recorded_timeline_as_wall_time(tmp_path):
    """Replaying the recording strategy: each problem's `recorded_wall_time_s` is the span of its recorded
    traces (first request to last delta), which the live run's own wall time contains; the replay's
    own run time stays in `wall_time_s`, apart."""
    ds = load_dataset("chain-sum", limit=4, seed=0)
    bank, store, run_id = await record_bank(tmp_path / "bank.db", ds, "self-consistency:n=3", tmp_path / "live.db",
                                            delay_s=0.004)
    live = {r.problem_id: r.result for r in store.rows(run_id)}
    replayed, backend = await _replay_rows(bank.path, ds, "self-consistency:n=3", tmp_path / "replay.db")
    for pid, result in replayed.items():
        traces = TraceBank(bank.path).traces(pid)
        span = max(t.deltas[-1].t for t in traces) - min(t.start for t in traces)
        assert result.usage.recorded_wall_time_s == pytest.approx(span, abs=1e-9), pid
        assert live[pid].usage.recorded_wall_time_s is None  # a live run has no recorded timeline
        assert live[pid].usage.wall_time_s >= result.usage.recorded_wall_time_s
    assert backend.recorded_wall_time("no-such-problem") is None
    backend.reset()
    assert backend.recorded_wall_time(ds.problems[0].id) is None


@pytest.mark.parametrize("strategy, why", [
    ("self-consistency:n=2,temperature=0.9", "temperature 0.9 requested, 0.6 recorded"),
    ("self-consistency:n=2,system_prompt=\"Answer in French.\"", "message 0 differs"),
])
async def test_a_request_unlike_the_recording_is_refused_by_name(tmp_path, strategy, why):
    """Serving a trace recorded under other prompts or another sampling distribution would be silently wrong."""
    ds = load_dataset("chain-sum", limit=2, seed=4)
    bank, _, _ = await record_bank(tmp_path / "bank.db", ds, "self-consistency:n=2", tmp_path / "live.db")
    rows, _ = await _replay_rows(bank.path, ds, strategy, tmp_path / "replay.db")
    assert len(rows) == 2 and all(r.answer is None and why in r.error for r in rows.values()), rows
    same, _ = await _replay_rows(bank.path, ds, "self-consistency:n=2,max_tokens=4", tmp_path / "same.db")
    assert all(t.status.value == "finished" for r in same.values() for t in r.traces)


async def test_a_request_the_bank_cannot_serve_is_a_problem_error(tmp_path):
    """More traces than recorded, or a longer max_tokens than a trace was cut at: a strategy would go on with
    the branches it has (self-consistency tolerates a failed one) and store a result the live strategy would
    not give; the eval stores each problem as an error naming why instead. Fewer traces, or a shorter limit,
    replay fine."""
    ds = load_dataset("chain-sum", limit=2, seed=5)
    bank, _, _ = await record_bank(tmp_path / "bank.db", ds, "self-consistency:n=3,max_tokens=6", tmp_path / "l.db")
    cut = [t for pid in bank.load_all() for t in bank.traces(pid) if t.finish_reason == "length"]
    assert cut  # the scripted answers run past 6 tokens
    for strategy, why in (("self-consistency:n=4,max_tokens=6", "has 3 traces"),
                          ("self-consistency:n=3,max_tokens=12", "cut at the recorded max_tokens 6")):
        rows, _ = await _replay_rows(bank.path, ds, strategy, tmp_path / f"{why[:6]}.db")
        assert len(rows) == 2 and all(r.answer is None and why in r.error for r in rows.values()), rows
    ok, _ = await _replay_rows(bank.path, ds, "self-consistency:n=2,max_tokens=4", tmp_path / "ok.db")
    assert all(r.error is None and len(r.traces) == 2 for r in ok.values())


def test_a_file_that_is_not_a_bank_is_refused_by_name_and_left_as_it_is(tmp_path):
    """Not SQLite at all, a folder, or another SQLite file (a results database): a ConfigError naming the
    file, and the results database gets no bank tables; on the command line a one-line error, exit 2."""
    import sqlite3
    import subprocess
    import sys

    from ttscale.errors import ConfigError

    text = tmp_path / "notes.txt"
    text.write_text("not a bank\n")
    results = tmp_path / "results.db"
    ResultStore(results).close()
    tables = {r[0] for r in sqlite3.connect(results).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for path, why in ((text, "is not a ttscale trace bank"), (tmp_path, "is a folder"),
                      (results, "an SQLite database but not a ttscale trace bank")):
        with pytest.raises(ConfigError, match=why):
            TraceBank(path)
    after = {r[0] for r in sqlite3.connect(results).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert after == tables
    for cmd in (["bank", "info", str(text)],
                ["eval", "--dataset", "smoke", "--replay", str(text), "--db", str(tmp_path / "r.db"), "--no-progress"]):
        r = subprocess.run([sys.executable, "-m", "ttscale.cli", *cmd], capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr and str(text) in r.stderr, r.stderr
