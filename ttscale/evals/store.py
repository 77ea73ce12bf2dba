"""Results in SQLite, one row per finished problem, so an interrupted eval loses nothing it finished.

A result is keyed by (dataset, problem, strategy, config hash). The config hash covers everything that
decides the outcome: the strategy and its full config, the backend spec, budget, limits, base seed and
dataset options. A run is the set of rows sharing (dataset, strategy, config hash); its id is derived from
them, so re-running the same command finds the same run and skips what is stored.

The database is in WAL mode and each row is committed on its own: a SIGKILL between two problems keeps
every problem finished before it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ttscale.errors import ConfigError
from ttscale.types import Result

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    strategy TEXT NOT NULL,
    spec TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    backend TEXT NOT NULL,
    total INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    dataset TEXT NOT NULL,
    problem_id TEXT NOT NULL,
    strategy TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    seed INTEGER,
    answer TEXT,
    reference TEXT,
    correct INTEGER,
    generated_tokens INTEGER NOT NULL,
    sequential_tokens INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    saved_tokens INTEGER NOT NULL,
    wall_time_s REAL NOT NULL,
    result TEXT NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (dataset, problem_id, strategy, config_hash)
);
CREATE INDEX IF NOT EXISTS results_run ON results(run_id);
"""


def _result_json(result: Result) -> str:
    # Branch meta may hold the exception that failed a branch: stored as its text.
    return result.model_dump_json(fallback=lambda v: f"{type(v).__name__}: {v}")


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a JSON-able config (sorted keys)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_run_id(dataset: str, strategy_spec: str, chash: str) -> str:
    return hashlib.sha256(f"{dataset}|{strategy_spec}|{chash}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    dataset: str
    strategy: str
    spec: str
    config_hash: str
    config: dict[str, Any]
    backend: str
    total: int
    status: str
    created_at: float


@dataclass(frozen=True)
class Row:
    """One stored result (the Result itself is in `result`)."""

    run_id: str
    dataset: str
    problem_id: str
    idx: int
    answer: str | None
    reference: str | None
    correct: bool | None
    generated_tokens: int
    sequential_tokens: int
    prompt_tokens: int
    saved_tokens: int
    wall_time_s: float
    finished_at: float
    result: Result


class ResultStore:
    """SQLite store of eval results. Cheap to open; one connection per process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ runs
    def ensure_run(self, *, dataset: str, strategy: str, spec: str, config: dict[str, Any], backend: str,
                   total: int) -> RunInfo:
        """The run for this (dataset, strategy, config); created when new, its total updated when it grew."""
        chash = config_hash(config)
        run_id = make_run_id(dataset, spec, chash)
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            row = self.conn.execute("SELECT total FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                self.conn.execute(
                    "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (run_id, dataset, strategy, spec, chash, json.dumps(config, sort_keys=True, default=str),
                     backend, total, now, now, "running"),
                )
            else:
                self.conn.execute("UPDATE runs SET total=MAX(total, ?), updated_at=?, status='running' WHERE run_id=?",
                                  (total, now, run_id))
        return self.run(run_id)

    def set_status(self, run_id: str, status: str) -> None:
        self.conn.execute("UPDATE runs SET status=?, updated_at=? WHERE run_id=?", (status, time.time(), run_id))

    def run(self, run_id: str) -> RunInfo:
        r = self.conn.execute("SELECT run_id, dataset, strategy, spec, config_hash, config, backend, total, status, "
                              "created_at FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if r is None:
            known = [x.run_id for x in self.runs()]
            raise ConfigError(f"no run {run_id!r} in {self.path}; runs there: {', '.join(known) or '(none)'}")
        return RunInfo(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9])

    def runs(self) -> list[RunInfo]:
        ids = [r[0] for r in self.conn.execute("SELECT run_id FROM runs ORDER BY created_at, run_id")]
        return [self.run(i) for i in ids]

    # ------------------------------------------------------------------------------ results
    def done_ids(self, run: RunInfo) -> set[str]:
        cur = self.conn.execute("SELECT problem_id FROM results WHERE dataset=? AND strategy=? AND config_hash=?",
                                (run.dataset, run.strategy, run.config_hash))
        return {r[0] for r in cur}

    def add(self, run: RunInfo, idx: int, seed: int | None, result: Result, reference: str | None) -> bool:
        """Store one finished problem (committed at once). False when it was already stored."""
        u = result.usage
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run.dataset, result.problem_id, run.strategy, run.config_hash, run.run_id, idx, seed, result.answer,
             reference, None if result.correct is None else int(result.correct), u.generated_tokens,
             u.sequential_tokens, u.prompt_tokens, u.saved_tokens, u.wall_time_s, _result_json(result),
             time.time()),
        )
        return cur.rowcount == 1

    def rows(self, run_id: str) -> list[Row]:
        cur = self.conn.execute(
            "SELECT run_id, dataset, problem_id, idx, answer, reference, correct, generated_tokens, sequential_tokens, "
            "prompt_tokens, saved_tokens, wall_time_s, finished_at, result FROM results WHERE run_id=? ORDER BY idx",
            (run_id,))
        return [Row(r[0], r[1], r[2], r[3], r[4], r[5], None if r[6] is None else bool(r[6]), r[7], r[8], r[9],
                    r[10], r[11], r[12], Result.model_validate_json(r[13])) for r in cur]

    def count(self, run_id: str) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM results WHERE run_id=?", (run_id,)).fetchone()[0])

    def resolve(self, refs: Iterable[str]) -> list[RunInfo]:
        """Runs named by id (or unique id prefix); every run when `refs` is empty."""
        refs = list(refs)
        if not refs:
            return self.runs()
        all_runs = self.runs()
        out = []
        for ref in refs:
            hits = [r for r in all_runs if r.run_id == ref] or [r for r in all_runs if r.run_id.startswith(ref)]
            if len(hits) != 1:
                known = ", ".join(f"{r.run_id} ({r.spec} on {r.dataset})" for r in all_runs) or "(none)"
                what = "no" if not hits else "more than one"
                raise ConfigError(f"{what} run matches {ref!r} in {self.path}; runs: {known}")
            out.append(hits[0])
        return out
