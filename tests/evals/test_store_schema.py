"""The results database's schema: older files gain the added columns, and runners opening one file at once
(new or old) all get a usable store (the second ALTER of a race used to fail with "duplicate column name")."""

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from ttscale.evals.store import _ADDED_COLUMNS, _ADDED_RUN_COLUMNS, _SETTLED_QUERY, ResultStore

OPENERS = 6


def _first_release_schema(path: Path) -> None:
    """A database as the first release wrote it: the tables without any of the added columns (nor the index
    over some of them)."""
    with ResultStore(path) as store:
        schema = [r[0] for r in store.conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL "
                                                   "AND name != 'results_settled'")]
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    for sql in schema:
        for name, definition in (*_ADDED_COLUMNS, *_ADDED_RUN_COLUMNS):
            sql = sql.replace(f",\n    {name} {definition}", "")
        conn.execute(sql)
    conn.commit()
    conn.close()


def _columns(path: Path, table: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


def _open_after(barrier, path: str, errors) -> None:
    barrier.wait(timeout=60)  # a parent killed before all started leaves no child waiting for ever
    try:
        ResultStore(path).close()
    except Exception as exc:  # reported to the parent, which asserts there are none
        errors.put(repr(exc))


def test_old_database_gains_the_added_columns(tmp_path):
    db = tmp_path / "old.db"
    _first_release_schema(db)
    assert not {n for n, _ in _ADDED_COLUMNS} & _columns(db, "results")
    ResultStore(db).close()
    assert {n for n, _ in _ADDED_COLUMNS} <= _columns(db, "results")
    assert {n for n, _ in _ADDED_RUN_COLUMNS} <= _columns(db, "runs")
    _assert_claims_read_the_index(db)


def _assert_claims_read_the_index(db: Path) -> None:
    """A claim's query of which candidates are settled is answered from an index, without reading the rows
    (whose `result` JSON precedes the columns it needs)."""
    conn = sqlite3.connect(db)
    try:
        plan = " ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {_SETTLED_QUERY} AND problem_id IN (?,?)",
                                                   ("d", "s", "h", "p0", "p1")))
    finally:
        conn.close()
    assert "COVERING INDEX" in plan, plan


def test_a_new_database_answers_claims_from_an_index(tmp_path):
    ResultStore(tmp_path / "new.db").close()
    _assert_claims_read_the_index(tmp_path / "new.db")


@pytest.mark.parametrize("start", ["new", "old"])
def test_runners_opening_one_database_at_once_all_succeed(tmp_path, start):
    db = tmp_path / "results.db"
    if start == "old":
        _first_release_schema(db)
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(OPENERS), ctx.Queue()
    procs = [ctx.Process(target=_open_after, args=(barrier, str(db), errors), daemon=True) for _ in range(OPENERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * OPENERS
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    assert {n for n, _ in _ADDED_COLUMNS} <= _columns(db, "results")


def test_another_sqlite_database_is_refused_untouched(tmp_path):
    from ttscale.errors import ConfigError

    other = tmp_path / "bank.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE traces (problem_id TEXT, idx INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="not a ttscale results database.*traces"):
        ResultStore(other)
    assert _columns(other, "runs") == set()  # nothing added to it
