"""Trace bank: generations recorded once, with their timing, to be replayed by `ReplayBackend`.

Recording is a live run seen through `RecordingBackend`, a wrapper around any backend that keeps every
Delta it hands to the Context, stamped with its arrival time relative to the problem's first request.
A trace is one request: its messages and sampling, the deltas (text, token ids, logprobs, top logprobs,
prompt tokens), per-token timestamps, and how it ended (`finished`, `aborted` by the strategy, `failed`).
Traces of a problem are numbered in the order their requests started.

While recording, deltas pass one at a time, each once the event loop is quiet again (`DeltaGate`): the
strategy has reacted to one delta (cancelled, spawned, noted) before the next is applied. The simulated
replay clock does the same, so replaying the recording strategy gives its decisions and token counts
exactly, aborted branches included (see replay.py).

Storage: SQLite (any path not ending in `.jsonl`; WAL, one transaction per problem) or JSONL (one header
line, then `{"problem": ...}` and `{"trace": ...}` lines; a problem's later lines replace earlier ones).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import hashlib
import itertools
import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ttscale.backends.base import Backend, DeltaStream, WrappingBackend
from ttscale.errors import ConfigError
from ttscale.evals.sqlite_files import connect_shared
from ttscale.types import Delta, GenerationRequest, Problem

BANK_VERSION = 1

# The problem whose requests are running in this task (set by the eval runner; inherited by branch tasks).
CURRENT_PROBLEM: contextvars.ContextVar[str | None] = contextvars.ContextVar("ttscale_current_problem", default=None)


def prompt_key(request: GenerationRequest | Problem) -> str:
    """What identifies a problem in a request: the first user message (or the raw prompt)."""
    if isinstance(request, Problem):
        msgs = request.chat()
    elif request.messages is not None:
        msgs = request.messages
    elif request.prompt is not None:
        return request.prompt
    else:
        return "ids:" + hashlib.sha256(json.dumps(request.prompt_token_ids).encode()).hexdigest()[:16]
    for m in msgs:
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else json.dumps(c, sort_keys=True)
    return json.dumps(msgs, sort_keys=True)


class RecordedDelta(Delta):
    """One delta as the Context received it. `t`: seconds since the problem's first request started.

    The request id is not kept (a replay gives each delta the id of the request it serves).
    """

    request_id: str = ""
    t: float
    seq: int = 0

    @classmethod
    def of(cls, d: Delta, t: float, seq: int) -> RecordedDelta:
        return cls(**d.model_dump(exclude={"request_id"}), t=t, seq=seq)

    def to_delta(self, request_id: str) -> Delta:
        return Delta(**self.model_dump(exclude={"request_id", "t", "seq"}), request_id=request_id)


class RecordedTrace(BaseModel):
    """One recorded request of a problem (see the module docstring)."""

    problem_id: str
    index: int
    start: float
    request_id: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    status: Literal["finished", "aborted", "failed"] = "aborted"
    finish_reason: str | None = None
    error: str | None = None
    deltas: list[RecordedDelta] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def num_tokens(self) -> int:
        return sum(d.n_tokens for d in self.deltas)

    @property
    def logprobs(self) -> list[float]:
        return [x for d in self.deltas for x in (d.logprobs or [])]

    @property
    def token_times(self) -> list[float]:
        """Per-token timestamps (tokens of one delta share its arrival time)."""
        return [d.t for d in self.deltas for _ in range(d.n_tokens)]

    @property
    def top_logprobs_k(self) -> int:
        """The k the trace was recorded with: the largest candidate list (banks recorded before
        `top_logprob_texts` lost candidates whose texts collided, so a few lists are shorter)."""
        ks = [len(x) for d in self.deltas for x in (d.top_logprobs or [])]
        return max(ks) if ks else 0


# ------------------------------------------------------------------------------------------------ storage


class TraceBank:
    """A bank on disk: read it (`problems`, `traces`) or add to it (`put`). SQLite or JSONL by suffix."""

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = Path(path)
        self.jsonl = self.path.suffix == ".jsonl"
        if not create and not self.path.exists():
            raise ConfigError(f"trace bank {str(self.path)!r} does not exist; record one with `ttscale bank record`")
        if self.path.is_dir():
            raise ConfigError(f"trace bank {str(self.path)!r} is a folder; give a .db / .sqlite or .jsonl file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._problems: dict[str, Problem] = {}
        self._traces: dict[str, list[RecordedTrace]] = {}
        self.meta: dict[str, Any] = {}
        if self.jsonl:
            self._load_jsonl()
            return
        try:
            self.conn = connect_shared(self.path)
            self._open_sqlite(create)
        except sqlite3.DatabaseError as exc:  # not SQLite at all ("file is not a database"), unreadable, ...
            raise ConfigError(f"{str(self.path)!r} is not a ttscale trace bank ({exc}); a bank is a .jsonl file "
                              "or an SQLite file `ttscale bank record` wrote") from exc

    def _open_sqlite(self, create: bool) -> None:
        """The bank's tables, created only in a new (empty) file: another SQLite file (a results database) is
        refused as it is, not given bank tables."""
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            self.conn.close()
            raise ConfigError(f"{str(self.path)!r} is an SQLite database but not a ttscale trace bank (it holds "
                              f"tables {', '.join(sorted(tables))})")
        self.conn.executescript(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS problems (problem_id TEXT PRIMARY KEY, key TEXT NOT NULL,"
            " problem TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS traces (problem_id TEXT NOT NULL, idx INTEGER NOT NULL,"
            " status TEXT NOT NULL, num_tokens INTEGER NOT NULL, text TEXT NOT NULL, trace TEXT NOT NULL,"
            " PRIMARY KEY (problem_id, idx));"
        )
        self.meta = {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}
        if not create and "version" not in self.meta:
            raise ConfigError(f"{str(self.path)!r} is not a ttscale trace bank (no version in its meta table)")

    # -- jsonl
    def _load_jsonl(self) -> None:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    if lineno > 1:  # a line cut short by a kill: everything before it is whole
                        break
                    raise ConfigError(f"{self.path}:{lineno}: not a ttscale trace bank line") from exc
                if "ttscale_bank" in obj:
                    self.meta.update(obj.get("meta", {}))
                elif "problem" in obj:
                    p = Problem.model_validate(obj["problem"])
                    self._problems[p.id] = p
                    self._traces[p.id] = [RecordedTrace.model_validate(t) for t in obj.get("traces", [])]
                else:
                    raise ConfigError(f"{self.path}:{lineno}: expected a 'problem' record")

    def _append_jsonl(self, obj: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            fh.flush()

    # -- writing
    def set_meta(self, **meta: Any) -> None:
        self.meta.update(meta)
        self.meta.setdefault("version", BANK_VERSION)
        if self.jsonl:
            self._append_jsonl({"ttscale_bank": BANK_VERSION, "meta": self.meta})
        else:
            with self.conn:
                self.conn.execute("BEGIN")
                for k, v in self.meta.items():
                    self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v, default=str)))

    def put(self, problem: Problem, traces: list[RecordedTrace]) -> None:
        """Store (or replace) one problem's traces in one transaction / one line."""
        traces = sorted(traces, key=lambda t: t.index)
        self._problems[problem.id] = problem
        self._traces[problem.id] = traces
        if self.jsonl:
            self._append_jsonl({"problem": problem.model_dump(), "traces": [t.model_dump() for t in traces]})
            return
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR REPLACE INTO problems VALUES (?,?,?)",
                              (problem.id, prompt_key(problem), problem.model_dump_json()))
            self.conn.execute("DELETE FROM traces WHERE problem_id=?", (problem.id,))
            self.conn.executemany(
                "INSERT INTO traces VALUES (?,?,?,?,?,?)",
                [(problem.id, t.index, t.status, t.num_tokens, t.text, t.model_dump_json()) for t in traces])

    # -- reading
    def problem_ids(self) -> list[str]:
        if self.jsonl:
            return list(self._problems)
        return [r[0] for r in self.conn.execute("SELECT problem_id FROM problems ORDER BY rowid")]

    def problems(self) -> dict[str, Problem]:
        if not self.jsonl:
            for pid, p in self.conn.execute("SELECT problem_id, problem FROM problems"):
                self._problems.setdefault(pid, Problem.model_validate_json(p))
        return dict(self._problems)

    def traces(self, problem_id: str) -> list[RecordedTrace]:
        if problem_id not in self._traces and not self.jsonl:
            rows = self.conn.execute("SELECT trace FROM traces WHERE problem_id=? ORDER BY idx", (problem_id,))
            self._traces[problem_id] = [RecordedTrace.model_validate_json(r[0]) for r in rows]
        return list(self._traces.get(problem_id, []))

    def load_all(self) -> dict[str, list[RecordedTrace]]:
        return {pid: self.traces(pid) for pid in self.problems()}

    def close(self) -> None:
        if not self.jsonl:
            self.conn.close()


# ------------------------------------------------------------------------------------------------ recording


async def settle(rounds: int = 3, cap: int = 10_000) -> None:
    """Yield until the event loop has nothing ready to run `rounds` times in a row (the strategy has reacted).

    Uses the default loop's ready queue; a loop without it (uvloop) gets a fixed number of yields.
    """
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    if ready is None:
        for _ in range(64):
            await asyncio.sleep(0)
        return
    idle = 0
    for _ in range(cap):
        await asyncio.sleep(0)
        idle = idle + 1 if len(ready) == 0 else 0
        if idle >= rounds:
            return


class LoopDriver:
    """A background task (`_drive`) on the running event loop, woken by `_kick`, started again when the
    loop changed or it ended, and cancelled by `aclose`. The record gate and the replay clock run on it."""

    driver_name = "ttscale-driver"

    def __init__(self) -> None:
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None

    def _restarting(self, new_loop: bool) -> None:
        """Called before a new driver starts; `new_loop`: the old one belonged to another event loop."""

    async def _drive(self) -> None:
        raise NotImplementedError

    def _kick(self) -> None:
        loop = asyncio.get_running_loop()
        if self._driver is None or self._driver.done() or self._driver.get_loop() is not loop:
            self._restarting(self._driver is not None and self._driver.get_loop() is not loop)
            self._wake = asyncio.Event()
            self._driver = loop.create_task(self._drive(), name=self.driver_name)
        assert self._wake is not None
        self._wake.set()

    async def aclose(self) -> None:
        if self._driver is not None and self._driver.get_loop() is asyncio.get_running_loop():
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        self._driver = None


class DeltaGate(LoopDriver):
    """Lets one delta through at a time, each once the loop is quiet again.

    While recording, this gives every delta the reaction it gets in a replay: the strategy sees each delta
    and finishes reacting to it (cancel, spawn, note) before the next one is applied, so the recorded
    order of deltas and reactions is one the simulated replay clock reproduces exactly.
    """

    driver_name = "ttscale-record-gate"

    def __init__(self) -> None:
        super().__init__()
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    def _restarting(self, new_loop: bool) -> None:
        self._waiting.clear()

    async def wait(self) -> None:
        self._kick()
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        await fut

    async def _drive(self) -> None:
        assert self._wake is not None
        while True:
            await settle()
            while self._waiting and self._waiting[0].done():
                self._waiting.popleft()
            if self._waiting:
                self._waiting.popleft().set_result(None)
                continue
            self._wake.clear()
            await self._wake.wait()


class RecordingBackend(WrappingBackend):
    """Wraps a live backend and records every request it serves, with timing, into a TraceBank.

    The eval runner sets `CURRENT_PROBLEM` around each problem and calls `commit(problem)` once the
    problem's Result is in; requests outside a known problem are attributed by their prompt. Forks and
    native runs would bypass `generate`, so their capabilities are withheld (a fork re-prefills instead).
    """

    withheld = ("shared_kv_fork", "concurrent_views", "engine_native")

    def __init__(self, inner: Backend, bank: TraceBank, *, spec: str = ""):
        super().__init__(inner, name=f"record({inner.name})")
        self.bank = bank
        self.spec = spec
        self._by_key: dict[str, str] = {}
        self._origin: dict[str, float] = {}
        self._count: dict[str, itertools.count] = defaultdict(itertools.count)
        self._pending: dict[str, list[RecordedTrace]] = defaultdict(list)
        self._seq = itertools.count()
        self._gate = DeltaGate()

    def register(self, problems: Iterable[Problem]) -> None:
        for p in problems:
            self._by_key.setdefault(prompt_key(p), p.id)

    def _problem_of(self, request: GenerationRequest) -> str:
        pid = CURRENT_PROBLEM.get()
        if pid is not None:
            return pid
        key = prompt_key(request)
        return self._by_key.get(key) or "prompt:" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def begin(self, problem_id: str) -> None:
        """Forget partial traces of a problem (a retry starts its recording afresh)."""
        self._pending.pop(problem_id, None)
        self._origin.pop(problem_id, None)
        self._count.pop(problem_id, None)

    async def generate(self, request: GenerationRequest) -> DeltaStream:
        pid = self._problem_of(request)
        now = time.monotonic()
        origin = self._origin.setdefault(pid, now)
        rec = RecordedTrace(problem_id=pid, index=next(self._count[pid]), start=now - origin,
                            request_id=request.request_id, messages=request.messages, prompt=request.prompt,
                            sampling=request.sampling.model_dump())
        self._pending[pid].append(rec)
        stream = self.inner.generate(request)
        try:
            async with contextlib.aclosing(stream):
                async for d in stream:
                    await self._gate.wait()
                    rec.deltas.append(RecordedDelta.of(d, time.monotonic() - origin, next(self._seq)))
                    if d.finished:
                        reason = d.finish_reason or "stop"
                        rec.finish_reason = reason
                        rec.status = ("failed" if (d.error or reason == "error") else
                                      "aborted" if reason == "abort" else "finished")
                    yield d
                    if d.finished:
                        return
                if rec.finish_reason is None:
                    rec.status, rec.finish_reason = "finished", "stop"
        except BaseException as exc:
            if rec.finish_reason is None:
                if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                    rec.status, rec.finish_reason = "aborted", "abort"
                else:
                    rec.status, rec.finish_reason = "failed", "error"
                    rec.error = f"{type(exc).__name__}: {exc}"
            raise

    def commit(self, problem: Problem) -> int:
        """Write the problem's traces to the bank; returns how many."""
        traces = self._pending.pop(problem.id, [])
        self._origin.pop(problem.id, None)
        self._count.pop(problem.id, None)
        self.bank.put(problem, traces)
        return len(traces)

    async def close(self) -> None:
        await self._gate.aclose()
        await super().close()
