"""A failed problem is an error, not a wrong answer; the eval CLI fails cleanly (issue 17, items 3 and 10).

The CLI runs as a real subprocess on real SQLite files against the stand-in HTTP upstream of
tests/reliability/eval_standin.py; `Pipeline` runs in-process against the same upstream.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability.eval_standin import (
    TTSCALE,
    TTY_ENV,
    EvalUpstream,
    eval_cmd,
    run_eval,
    run_statuses,
    stored_rows,
    write_dataset,
)
from ttscale.evals.datasets import DatasetError, read_jsonl
from ttscale.evals.report import compare, table_rows
from ttscale.evals.store import ResultStore, RunInfo, new_owner_id
from ttscale.types import Result, Usage

PROBLEMS = 6


@pytest.fixture
def upstream():
    with EvalUpstream(delay_s=0.0) as up:
        yield up


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "sums.jsonl", PROBLEMS)


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------------------------- failures as errors


def test_failing_upstream_gives_error_rows_exit_1_and_a_rerun_retries_them(upstream, dataset, tmp_path):
    db = tmp_path / "results.db"
    upstream.set_failing(True)
    failed = run_eval(eval_cmd(dataset, db, upstream.spec, progress=True), extra_env=TTY_ENV)
    assert failed.returncode == 1, failed.stderr
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", failed.stdout)
    assert f"0 solved now, {PROBLEMS} failed" in plain
    assert f"{PROBLEMS}/{PROBLEMS} acc - errors {PROBLEMS} " in plain, plain[-1500:]  # live progress
    rows = stored_rows(db)
    assert len(rows) == PROBLEMS and {(r[3], r[4], r[5]) for r in rows} == {(None, None, "error")}
    assert run_statuses(db) == ["error"]
    with ResultStore(db) as store:
        (run,) = store.runs()
        reasons = {r.error for r in store.rows(run.run_id)}
        summary = compare(store, [run])[0]
    assert all("500" in r and "failing on purpose" in r for r in reasons), reasons
    assert summary.errors == PROBLEMS and summary.summary.problems == 0  # not counted as wrong answers
    assert table_rows([summary])[0][4:6] == [str(PROBLEMS), "-"]  # errors column; no accuracy over 0 answers

    upstream.set_failing(False)
    served = sum(upstream.generations.values())
    retried = run_eval(eval_cmd(dataset, db, upstream.spec))
    assert retried.returncode == 0, retried.stderr
    assert f"{PROBLEMS} solved now" in retried.stdout and "failed" not in retried.stdout
    assert sum(upstream.generations.values()) - served == PROBLEMS * 2  # every errored problem ran again
    rows = stored_rows(db)
    assert {r[5] for r in rows} == {"ok"} and all(r[4] in (0, 1) for r in rows)
    assert run_statuses(db) == ["done"]


def test_max_failures_stops_the_run(upstream, dataset, tmp_path):
    db = tmp_path / "results.db"
    upstream.set_failing(True)
    stopped = run_eval(eval_cmd(dataset, db, upstream.spec, "--max-failures", "2", concurrency=1))
    assert stopped.returncode == 1
    assert "--max-failures 2" in stopped.stderr and "Traceback" not in stopped.stderr
    assert [r[5] for r in stored_rows(db)] == ["error", "error"]  # it stopped at the second failure
    assert sum(upstream.generations.values()) == 2 * 2
    assert run_statuses(db) == ["error"]


def test_errors_and_wrong_answers_are_reported_apart(tmp_path):
    """Accuracy is over answered problems; errors are counted in their own column."""
    with ResultStore(tmp_path / "r.db") as store:
        run = store.ensure_run(dataset="d", strategy="single", spec="single", config={"x": 1}, backend="b",
                               total=4)
        outcomes = [(True, None), (False, None), (None, "BackendError: 500"), (True, None)]
        for i, (correct, error) in enumerate(outcomes):
            result = Result(problem_id=f"p{i}", answer=None if error else "1", strategy="single",
                            correct=correct, error=error, usage=Usage(generated_tokens=0 if error else 10))
            store.add(run, i, i, result, "1")
        summary = compare(store, [run])[0]
        assert summary.errors == 1 and summary.summary.problems == 3
        assert summary.summary.accuracy == pytest.approx(2 / 3)
        assert store.done_ids(run) == {"p0", "p1", "p3"}  # the errored problem is left to retry
        ok_again = Result(problem_id="p0", answer="2", strategy="single", correct=False)
        assert not store.add(run, 0, 0, ok_again, "1")  # an answered problem is never overwritten
        retried = Result(problem_id="p2", answer="1", strategy="single", correct=True)
        assert store.add(run, 2, 2, retried, "1")  # an errored one is
        assert [(r.problem_id, r.status, r.correct) for r in store.rows(run.run_id)] == [
            ("p0", "ok", True), ("p1", "ok", False), ("p2", "ok", True), ("p3", "ok", True)]


async def test_pipeline_marks_problems_whose_branches_all_failed(upstream):
    from ttscale.backends.openai import OpenAIBackend
    from ttscale.pipeline import Pipeline

    problems = [{"id": f"p{i:02d}", "prompt": f"Problem p{i:02d}: what is {i} + 1?", "answer": str(i + 1)}
                for i in range(3)]
    upstream.set_failing(True)
    backend = OpenAIBackend(upstream.url, model="standin", detect=False, max_retries=0)
    async with Pipeline(backend, "self-consistency:n=2", concurrency=2) as pipe:
        results = await pipe.run(problems)
        # one failed problem does not lose the others
        assert [r.problem_id for r in results] == ["p00", "p01", "p02"]
        assert all(r.failed and r.answer is None and r.correct is None for r in results)
        assert all("all 2 branch(es) failed" in r.error and "500" in r.error for r in results)
        upstream.set_failing(False)
        healthy = await pipe.solve(problems[0])
        assert not healthy.failed and healthy.correct is True
    await backend.close()


def test_ttscale_run_reports_a_failed_problem_as_a_failure(upstream):
    upstream.set_failing(True)
    out = run_eval([TTSCALE, "run", "Problem p00: what is 1 + 2?", "--backend", upstream.spec,
                    "--strategy", "self-consistency:n=2", "--max-tokens", "16"])
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "failed:" in out.stderr and "500" in out.stderr
    upstream.set_failing(False)
    ok = run_eval([TTSCALE, "run", "Problem p00: what is 1 + 2?", "--backend", upstream.spec,
                   "--strategy", "self-consistency:n=2", "--max-tokens", "16", "--answer", "3"])
    assert ok.returncode == 0 and "(correct)" in ok.stdout, ok.stderr


# ------------------------------------------------------------------------------------- clean CLI errors


def test_corrupt_database_is_bad_input(upstream, dataset, tmp_path):
    db = tmp_path / "results.db"
    db.write_bytes(b"not a database at all\n" * 200)
    out = run_eval(eval_cmd(dataset, db, upstream.spec))
    assert out.returncode == 2
    line = one_line_error(out.stderr)
    assert str(db) in line and "not a database" in line
    assert sum(upstream.generations.values()) == 0  # it failed before anything ran


def _small_file_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_disk_full_fails_the_run_cleanly(upstream, tmp_path):
    dataset = write_dataset(tmp_path / "many.jsonl", 40)
    db = tmp_path / "results.db"
    out = run_eval(eval_cmd(dataset, db, upstream.spec, concurrency=4), preexec_fn=_small_file_limit)
    assert out.returncode == 1
    line = one_line_error(out.stderr)
    assert str(db) in line and "re-run the same command" in line
    kept = stored_rows(db)
    assert 0 < len(kept) < 40 and {r[5] for r in kept} == {"ok"}  # what was committed before is intact


def test_invalid_utf8_names_the_file_and_line(upstream, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "prompt": "Problem p00: what is 1 + 1?", "answer": "2"}).encode()
    path.write_bytes(good + b"\n" + b'{"id": "b", "prompt": "caf\xe9", "answer": "1"}\n')
    out = run_eval(eval_cmd(path, tmp_path / "r.db", upstream.spec))
    assert out.returncode == 2
    line = one_line_error(out.stderr)
    assert f"{path}:2" in line and "UTF-8" in line and "0xe9" in line


def test_null_id_is_an_error_naming_the_line(upstream, tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "answer": "1"}\n{"id": null, "prompt": "y", "answer": "2"}\n',
                    encoding="utf-8")
    out = run_eval(eval_cmd(path, tmp_path / "r.db", upstream.spec))
    assert out.returncode == 2
    line = one_line_error(out.stderr)
    assert f"{path}:2" in line and "'id'" in line and "null" in line
    for bad in ("[1]", "true", '""', "1.5"):
        path.write_text(f'{{"id": {bad}, "prompt": "y", "answer": "2"}}\n', encoding="utf-8")
        with pytest.raises(DatasetError, match=rf"{path}:1: field 'id'"):
            read_jsonl(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"id": 7, "prompt": "café?", "answer": "1"}\n'.encode())
    (p,) = read_jsonl(path)
    assert (p.id, p.prompt) == ("7", "café?")


# ------------------------------------------------------------------------------------- claims


def _run(store: ResultStore) -> RunInfo:
    return store.ensure_run(dataset="d", strategy="single", spec="single", config={"x": 1}, backend="b",
                            total=3)


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    ids = ["p0", "p1", "p2"]
    with ResultStore(tmp_path / "r.db") as store:
        run = _run(store)
        me = new_owner_id()
        elsewhere = "other-host:4242:abcd"  # a runner on another machine: only its lease can free its claims
        assert store.claim(run, ids, elsewhere, lease_s=60, since=0).problem_id == "p0"
        live_here = f"{new_owner_id().split(':')[0]}:{os.getppid()}:x"  # a live process on this host
        assert store.claim(run, ids, live_here, lease_s=60, since=0).problem_id == "p1"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        dead_here = f"{new_owner_id().split(':')[0]}:{dead.stdout.strip()}:y"
        assert store.claim(run, ids, dead_here, lease_s=60, since=0).problem_id == "p2"

        mine = store.claim(run, ids, me, lease_s=60, since=0)
        assert mine.problem_id == "p2" and mine.held_by_others == 2  # the dead process's claim, at once
        nothing = store.claim(run, ids, me, lease_s=60, since=0)
        assert nothing.problem_id is None and nothing.held_by_others == 2  # the others wait on their leases
        store.heartbeat(elsewhere, lease_s=-1)  # its lease ran out (it stopped renewing)
        assert store.claim(run, ids, me, lease_s=60, since=0).problem_id == "p0"
        assert store.claims(run.run_id) == {"p0": me, "p1": live_here, "p2": me}
        store.release(me)
        assert store.claims(run.run_id) == {"p1": live_here}


def test_concurrent_claims_never_share_a_problem(tmp_path):
    """Four connections (as four runners would hold) claim from threads at once; each problem goes once."""
    db = tmp_path / "r.db"
    ids = [f"p{i}" for i in range(200)]
    with ResultStore(db) as store:
        run = _run(store)
    got: dict[str, list[str]] = {}
    start = threading.Barrier(4)

    def runner() -> None:
        owner = new_owner_id()
        mine: list[str] = []
        with ResultStore(db) as own:
            start.wait()
            while (c := own.claim(run, ids, owner, lease_s=60, since=0)).problem_id is not None:
                mine.append(c.problem_id)
        got[owner] = mine

    threads = [threading.Thread(target=runner) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    claimed = [pid for mine in got.values() for pid in mine]
    assert len(got) == 4 and sorted(claimed) == sorted(ids)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from(["open", "ok", "old-error", "new-error", "held"]), min_size=1, max_size=600))
def test_claiming_from_what_is_still_open_claims_as_claiming_from_everything(states):
    """A runner leaves out of later claims what a claim passed over as settled (and what it claimed): the
    problems it gets, in order, are those a claim over every candidate would give; crosses the chunks."""
    ids = [f"p{i}" for i in range(len(states))]
    expected = [pid for pid, s in zip(ids, states, strict=True) if s in ("open", "old-error")]
    with tempfile.TemporaryDirectory() as d, ResultStore(Path(d) / "r.db") as store:
        run = _run(store)
        other = "other-host:4242:abcd"

        def row(pid: str, error: str | None) -> None:
            store.add(run, 0, 0, Result(problem_id=pid, strategy="single", answer=None if error else "1",
                                        usage=Usage(), error=error), "1")

        for pid, s in zip(ids, states, strict=True):
            if s == "old-error":
                row(pid, "an earlier runner's error")
        since = time.time()
        while time.time() <= since:  # rows stored from here on are this runner's
            time.sleep(0.001)
        for pid, s in zip(ids, states, strict=True):
            if s in ("ok", "new-error"):
                row(pid, "failed here" if s == "new-error" else None)
            elif s == "held":
                store.claim(run, [pid], other, lease_s=600, since=since)
        open_ids = dict.fromkeys(ids)
        got = []
        while (c := store.claim(run, open_ids, "me:1:x", lease_s=60, since=since)).problem_id is not None:
            assert all(states[int(pid[1:])] in ("ok", "new-error") for pid in c.settled)
            for pid in c.settled:
                open_ids.pop(pid)
            open_ids.pop(c.problem_id)
            got.append(c.problem_id)
        assert got == expected
        assert c.held_by_others == states.count("held")
        assert store.claim(run, ids, "me:1:x", lease_s=60, since=since).problem_id is None
