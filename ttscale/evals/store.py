"""Results in SQLite, one row per finished problem, so an interrupted eval loses nothing it finished.

A result is keyed by (dataset, problem, strategy, config hash). The config hash covers everything that
decides the outcome: the strategy and its full config, the backend spec, budget, limits, base seed and
dataset options. A run is the set of rows sharing (dataset, strategy, config hash); its id is derived from
them, so re-running the same command finds the same run and skips what is stored.

The database is in WAL mode and each row is committed on its own: a SIGKILL between two problems keeps
every problem finished before it.

A row has a status: `ok` (an answer, right or wrong) or `error` (the problem could not be solved: every
branch failed, the backend raised). Error rows keep the reason, are not graded, and are retried by the next
runner that starts; an ok row is never overwritten.

Runners share the work of a run through claims: a runner takes a problem by writing a (run, problem) claim
row with its owner id and an expiry, inside `BEGIN IMMEDIATE`, so two runners never take the same problem.
Claims are renewed while the problem runs (`heartbeat`) and dropped when its row is stored. A claim whose
owner was killed is taken over when it expires, or at once when the owner was a process on this host that
no longer exists.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ttscale.errors import ConfigError
from ttscale.evals.sqlite_files import connect_shared
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
    status TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
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
    status TEXT NOT NULL DEFAULT 'ok',
    error TEXT,
    sequential_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset, problem_id, strategy, config_hash)
);
CREATE INDEX IF NOT EXISTS results_run ON results(run_id);
CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT NOT NULL,
    problem_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (run_id, problem_id)
);
"""

# Columns added after the first release (new databases get them from _SCHEMA): (name, definition) added to
# older databases when opened.
_ADDED_COLUMNS = (("status", "TEXT NOT NULL DEFAULT 'ok'"), ("error", "TEXT"),
                  ("sequential_prompt_tokens", "INTEGER NOT NULL DEFAULT 0"))
# Run metadata that is not hashed (e.g. the width sweep a run belongs to, docs/outputs.md).
_ADDED_RUN_COLUMNS = (("meta", "TEXT NOT NULL DEFAULT '{}'"),)

_RESULT_COLUMNS = ("dataset", "problem_id", "strategy", "config_hash", "run_id", "idx", "seed", "answer",
                   "reference", "correct", "generated_tokens", "sequential_tokens", "prompt_tokens",
                   "saved_tokens", "wall_time_s", "result", "finished_at", "status", "error",
                   "sequential_prompt_tokens")
# A claim reads which of its candidates are settled: served from this index alone (the table's rows store
# `status` and `finished_at` after the `result` JSON, so reading them walked every trace).
_SETTLED_INDEX = ("CREATE INDEX IF NOT EXISTS results_settled "
                  "ON results(dataset, strategy, config_hash, problem_id, status, finished_at)")
_CLAIM_CHUNK = 256
_SETTLED_QUERY = "SELECT problem_id, status, finished_at FROM results WHERE dataset=? AND strategy=? AND config_hash=?"
_KEY = ("dataset", "problem_id", "strategy", "config_hash")
_UPSERT = (
    f"INSERT INTO results ({', '.join(_RESULT_COLUMNS)}) VALUES ({', '.join('?' for _ in _RESULT_COLUMNS)}) "
    f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in _RESULT_COLUMNS if c not in _KEY)
    + " WHERE results.status != 'ok'"
)


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
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One stored result (the Result itself is in `result`); `status`: `ok` or `error` (`error` says why)."""

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
    status: str = "ok"
    error: str | None = None
    sequential_prompt_tokens: int = 0

    @property
    def failed(self) -> bool:
        return self.status == "error"


def new_owner_id() -> str:
    """A claim owner: host, pid and a random part (one process may run several runners)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_gone(owner: str) -> bool:
    """True when `owner` was a process on this host that no longer exists (its claims are free at once)."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Claim:
    """What `ResultStore.claim` found: the problem now claimed (or None), how many others hold, and the
    candidates it passed over as settled."""

    problem_id: str | None
    held_by_others: int
    settled: list[str] = field(default_factory=list)


class ResultStore:
    """SQLite store of eval results. Cheap to open; one connection per process.

    Opening a file that is not a usable SQLite database raises ConfigError naming it (bad `--db`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = connect_shared(self.path)
            self._create_or_migrate()
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot use {str(self.path)!r} as a results database: {exc}") from exc

    def _create_or_migrate(self) -> None:
        """Tables created and older databases given their added columns in one write transaction: two runners
        opening the same new or old file at once would otherwise both see a column missing and the second
        ALTER would fail ("duplicate column name")."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and not tables & {"runs", "results", "claims"}:
                raise ConfigError(f"{str(self.path)!r} is an SQLite database but not a ttscale results database "
                                  f"(it holds tables {', '.join(sorted(tables))}); give --db a new file or one "
                                  "`ttscale eval` wrote")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            for table, added in (("results", _ADDED_COLUMNS), ("runs", _ADDED_RUN_COLUMNS)):
                have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
                for name, definition in added:
                    if name not in have:
                        self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
            self.conn.execute(_SETTLED_INDEX)  # after the columns it covers exist in older databases
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

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
                    "INSERT INTO runs (run_id, dataset, strategy, spec, config_hash, config, backend, total, "
                    "created_at, updated_at, status) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (run_id, dataset, strategy, spec, chash, json.dumps(config, sort_keys=True, default=str),
                     backend, total, now, now, "running"),
                )
            else:
                self.conn.execute("UPDATE runs SET total=MAX(total, ?), updated_at=?, status='running' WHERE run_id=?",
                                  (total, now, run_id))
        return self.run(run_id)

    def update_meta(self, run_id: str, **meta: Any) -> None:
        """Merge `meta` into the run's metadata (not part of its config hash)."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            row = self.conn.execute("SELECT meta FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise ConfigError(f"no run {run_id!r} in {self.path}")
            merged = {**json.loads(row[0] or "{}"), **meta}
            self.conn.execute("UPDATE runs SET meta=? WHERE run_id=?", (json.dumps(merged, sort_keys=True), run_id))

    def set_status(self, run_id: str, status: str) -> None:
        """`running`, `done` (every problem answered), `error` (some problems failed) or `interrupted`."""
        self.conn.execute("UPDATE runs SET status=?, updated_at=? WHERE run_id=?", (status, time.time(), run_id))

    def run(self, run_id: str) -> RunInfo:
        r = self.conn.execute("SELECT run_id, dataset, strategy, spec, config_hash, config, backend, total, status, "
                              "created_at, meta FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if r is None:
            known = [x.run_id for x in self.runs()]
            raise ConfigError(f"no run {run_id!r} in {self.path}; runs there: {', '.join(known) or '(none)'}")
        return RunInfo(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9],
                       json.loads(r[10] or "{}"))

    def runs(self) -> list[RunInfo]:
        ids = [r[0] for r in self.conn.execute("SELECT run_id FROM runs ORDER BY created_at, run_id")]
        return [self.run(i) for i in ids]

    # ------------------------------------------------------------------------------ claims
    def claim(self, run: RunInfo, candidates: Iterable[str], owner: str, *, lease_s: float,
              since: float) -> Claim:
        """Claim the first candidate nobody has settled or holds; atomic across processes.

        Settled: an ok row, or an error row stored at or after `since` (the runner's start: errors from
        earlier runners are retried, errors of this session are not). Held: a claim of another owner that
        has not expired and whose process is not known to be gone. Candidates are read in chunks, only as
        far as the first free one; `Claim.settled` names those passed over as settled, which stay so for
        this runner: left out of its later claims, each claim reads only what is still open instead of
        every row of the run.
        """
        now = time.time()
        passed: list[str] = []
        n_held = 0
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            held: set[str] = set()
            mine: set[str] = set()
            for pid, who, expires in self.conn.execute(
                    "SELECT problem_id, owner, expires_at FROM claims WHERE run_id=?", (run.run_id,)):
                if who == owner:
                    mine.add(pid)
                elif expires > now and not owner_gone(who):
                    held.add(pid)
            ids = iter(candidates)
            while chunk := list(itertools.islice(ids, _CLAIM_CHUNK)):
                settled = self._settled(run, chunk, since)
                for pid in chunk:
                    if pid in settled:
                        passed.append(pid)
                        continue
                    if pid in mine:
                        continue
                    if pid in held:
                        n_held += 1
                        continue
                    self.conn.execute("INSERT OR REPLACE INTO claims VALUES (?,?,?,?)",
                                      (run.run_id, pid, owner, now + lease_s))
                    return Claim(pid, n_held, passed)
        return Claim(None, n_held, passed)

    def _settled(self, run: RunInfo, ids: list[str], since: float) -> set[str]:
        """Which of `ids` are settled (see `claim`): read from the index alone, without the rows."""
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(f"{_SETTLED_QUERY} AND problem_id IN ({marks})",
                                 (run.dataset, run.strategy, run.config_hash, *ids))
        return {pid for pid, status, fin in rows if status == "ok" or fin >= since}

    def heartbeat(self, owner: str, lease_s: float) -> None:
        """Extend every claim of `owner` by `lease_s` from now."""
        self.conn.execute("UPDATE claims SET expires_at=? WHERE owner=?", (time.time() + lease_s, owner))

    def release(self, owner: str) -> None:
        """Drop every claim of `owner` (its problems go back to the pool)."""
        self.conn.execute("DELETE FROM claims WHERE owner=?", (owner,))

    def claims(self, run_id: str) -> dict[str, str]:
        """problem id -> owner of the claims held on a run (expired ones included)."""
        cur = self.conn.execute("SELECT problem_id, owner FROM claims WHERE run_id=?", (run_id,))
        return dict(cur.fetchall())

    # ------------------------------------------------------------------------------ results
    def done_ids(self, run: RunInfo) -> set[str]:
        """Problems with an answer (ok rows); errored problems are not done."""
        cur = self.conn.execute("SELECT problem_id FROM results "
                                "WHERE dataset=? AND strategy=? AND config_hash=? "
                                "AND status='ok'", (run.dataset, run.strategy, run.config_hash))
        return {r[0] for r in cur}

    def add(self, run: RunInfo, idx: int, seed: int | None, result: Result, reference: str | None,
            owner: str | None = None) -> bool:
        """Store one finished problem and drop `owner`'s claim on it, in one commit.

        A failed Result (`result.error`) is stored with status `error`. An error row is replaced by the next
        result for its problem; an ok row never is. False when an ok row was already stored.
        """
        u = result.usage
        status = "error" if result.error else "ok"
        correct = None if result.correct is None or result.error else int(result.correct)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            cur = self.conn.execute(_UPSERT, (
                run.dataset, result.problem_id, run.strategy, run.config_hash, run.run_id, idx, seed,
                result.answer, reference, correct, u.generated_tokens, u.sequential_tokens, u.prompt_tokens,
                u.saved_tokens, u.wall_time_s, _result_json(result), time.time(), status, result.error,
                u.sequential_prompt_tokens))
            if owner is not None:
                self.conn.execute("DELETE FROM claims WHERE run_id=? AND problem_id=? AND owner=?",
                                  (run.run_id, result.problem_id, owner))
        return cur.rowcount == 1

    def rows(self, run_id: str, *, errors: bool = True, problems: Collection[str] | None = None) -> list[Row]:
        """The stored rows of a run in dataset order; `errors=False` leaves errored problems out; `problems`:
        only those problem ids (an invocation's `--limit` after a larger one stored more)."""
        where = "" if errors else " AND status='ok'"
        cur = self.conn.execute(
            "SELECT run_id, dataset, problem_id, idx, answer, reference, correct, generated_tokens, sequential_tokens, "
            "prompt_tokens, saved_tokens, wall_time_s, finished_at, result, status, error, "
            "sequential_prompt_tokens "
            "FROM results "
            f"WHERE run_id=?{where} ORDER BY idx", (run_id,))
        return [Row(r[0], r[1], r[2], r[3], r[4], r[5], None if r[6] is None else bool(r[6]), r[7], r[8], r[9],
                    r[10], r[11], r[12], Result.model_validate_json(r[13]), r[14], r[15], r[16]) for r in cur
                if problems is None or r[2] in problems]

    def count(self, run_id: str, status: str | None = None, problems: Collection[str] | None = None) -> int:
        """Stored rows of a run; only those with `status` (`ok` / `error`) when given, and of `problems`."""
        if problems is not None:
            cur = self.conn.execute("SELECT problem_id, status FROM results WHERE run_id=?", (run_id,))
            return sum(1 for pid, st in cur if pid in problems and (status is None or st == status))
        args: tuple[str, ...]
        if status is None:
            q, args = "SELECT COUNT(*) FROM results WHERE run_id=?", (run_id,)
        else:
            q, args = "SELECT COUNT(*) FROM results WHERE run_id=? AND status=?", (run_id, status)
        return int(self.conn.execute(q, args).fetchone()[0])

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
