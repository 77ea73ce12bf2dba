"""`ttscale eval` killed mid-run and resumed, and two runners on one database (issue 17, acceptance 3).

Every test runs the real CLI as a subprocess on a real SQLite file against a stand-in HTTP upstream that
counts the generations it served per problem (tests/reliability/eval_standin.py). Kills happen once the
database shows a finished row (polled), never after a guessed sleep.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.reliability.eval_standin import (
    EvalUpstream,
    claims,
    eval_cmd,
    kill,
    run_eval,
    run_statuses,
    start_eval,
    stored_rows,
    wait_for_rows,
    write_dataset,
)

PROBLEMS = 12
N = 2  # self-consistency:n=2: two generations per computed problem


@pytest.fixture(scope="module")
def upstream():
    with EvalUpstream(delay_s=0.05) as up:
        yield up


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "sums.jsonl", PROBLEMS)


@pytest.fixture(scope="module")
def reference_rows(upstream: EvalUpstream, dataset: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """The rows of an uninterrupted run: what every interrupted-and-resumed run must end with."""
    db = tmp_path_factory.mktemp("ref") / "ref.db"
    before = sum(upstream.generations.values())
    done = run_eval(eval_cmd(dataset, db, upstream.spec))
    assert done.returncode == 0, done.stderr
    assert sum(upstream.generations.values()) - before == PROBLEMS * N
    rows = stored_rows(db)
    assert [r[0] for r in rows] == [f"p{i:02d}" for i in range(PROBLEMS)]
    assert {r[5] for r in rows} == {"ok"} and 0 < sum(r[4] for r in rows) < PROBLEMS  # right and wrong ones
    assert run_statuses(db) == ["done"]
    return rows


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_eval_resumes_to_the_uninterrupted_rows(sig, upstream, dataset, reference_rows, tmp_path):
    db = tmp_path / "results.db"
    proc = start_eval(eval_cmd(dataset, db, upstream.spec))
    wait_for_rows(db, proc, at_least=1)
    code, _, err = kill(proc, sig)
    at_kill = stored_rows(db)
    assert 1 <= len(at_kill) < PROBLEMS, "the kill did not land mid-eval"
    served_at_kill = upstream.generations.copy()
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM and "Traceback" not in err and "terminated" in err
        assert run_statuses(db) == ["interrupted"]  # not left `running`
        assert claims(db) == []  # its claims were released
    else:
        assert code == -signal.SIGKILL
        assert run_statuses(db) == ["running"]  # nothing can run on SIGKILL; the resume below fixes it

    resumed = run_eval(eval_cmd(dataset, db, upstream.spec))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed: {len(at_kill)} already stored" in resumed.stdout
    assert stored_rows(db) == reference_rows  # none lost, none duplicated, the same answers and seeds
    assert run_statuses(db) == ["done"] and claims(db) == []
    for pid, *_ in at_kill:  # problems stored before the kill were not computed again
        assert upstream.generations[pid] == served_at_kill[pid]


def test_two_runners_on_one_db_compute_no_problem_twice(upstream, dataset, reference_rows, tmp_path):
    db = tmp_path / "results.db"
    before = upstream.generations.copy()
    runners = [start_eval(eval_cmd(dataset, db, upstream.spec)) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in runners]
    assert [p.returncode for p in runners] == [0, 0], [e for _, e in outs]
    computed = upstream.generations - before
    assert computed == {f"p{i:02d}": N for i in range(PROBLEMS)}  # every problem once, by one runner
    solved = [int(out.split(" solved now")[0].rsplit(" ", 1)[1]) for out, _ in outs]
    assert sum(solved) == PROBLEMS
    assert stored_rows(db) == reference_rows
    assert run_statuses(db) == ["done"] and claims(db) == []
