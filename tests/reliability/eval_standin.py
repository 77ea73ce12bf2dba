"""A stand-in OpenAI-compatible upstream for `ttscale eval` run as a real subprocess, and helpers for it.

The upstream answers "Problem pNN: what is A + B?" with a streamed `\\boxed{A+B}` (one problem in four gets
A+B+1, a wrong answer), one word every `delay_s`, and counts the generations it served per problem, so a
test can tell which problems were computed and how often. With `fail=True` every generation gets a 500.
It runs in a thread on 127.0.0.1 (`ThreadedServer`), so a test can drive subprocesses synchronously meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.backends.standins import MODEL, ThreadedServer, add_generation_routes, stream_words
from tests.fixtures.real_backends import spawn_process_group

PROBLEM = re.compile(r"Problem (p\d+): what is (\d+) \+ (\d+)\?")
TTSCALE = str(Path(sys.executable).with_name("ttscale"))


def problem_answer(pid: str, a: int, b: int) -> int:
    """What the stand-in answers: right, except for one problem in four."""
    return a + b + (1 if int(pid[1:]) % 4 == 3 else 0)


def write_dataset(path: Path, n: int) -> Path:
    lines = [json.dumps({"id": f"p{i:02d}", "prompt": f"Problem p{i:02d}: what is {i} + {2 * i + 1}?",
                         "answer": str(3 * i + 1)}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def eval_app(delay_s: float, fail: bool) -> FastAPI:
    app = FastAPI()
    app.state.generations = Counter()
    app.state.fail = fail

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 4096}]}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        m = PROBLEM.search(json.dumps(body))
        if m is None:
            return JSONResponse({"error": {"message": "no problem in the prompt"}}, status_code=400)
        pid = m.group(1)
        app.state.generations[pid] += 1
        if app.state.fail:
            return JSONResponse({"error": {"message": "stand-in upstream is failing on purpose"}},
                                status_code=500)
        answer = problem_answer(pid, int(m.group(2)), int(m.group(3)))
        text = f"So the answer is \\boxed{{{answer}}}."
        return StreamingResponse(stream_words(text, chat, MODEL, prompt_tokens=9, delay_s=delay_s),
                                 media_type="text/event-stream")

    add_generation_routes(app, generate)
    return app


class EvalUpstream(ThreadedServer):
    """`eval_app` under uvicorn in a thread; `generations` counts generations per problem id."""

    def __init__(self, delay_s: float = 0.05, fail: bool = False) -> None:
        super().__init__(eval_app(delay_s, fail), name="eval-upstream", lifespan="off")

    @property
    def generations(self) -> Counter:
        return self.app.state.generations

    def set_failing(self, fail: bool) -> None:
        self.app.state.fail = fail

    @property
    def spec(self) -> str:
        """The `--backend` spec: no capability probe, no retries (a 500 fails the branch at once)."""
        return f"openai:{self.url}?model={MODEL}&detect=false&max_retries=0"


def eval_cmd(dataset: Path, db: Path, backend: str, *extra: str, n: int = 2,
             concurrency: int = 2, progress: bool = False) -> list[str]:
    return [TTSCALE, "eval", "--dataset", str(dataset), "--db", str(db), "--backend", backend,
            "--strategy", f"self-consistency:n={n}", "--max-tokens", "16", "--concurrency", str(concurrency),
            "--progress" if progress else "--no-progress", *extra]


# Makes Rich draw the live progress bar into a pipe, wide enough for every column.
TTY_ENV = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "250"}


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}


def start_eval(cmd: list[str], **kw: object) -> subprocess.Popen:
    """The eval in a process group that ends with the test run, however that ends (see spawn_process_group)."""
    return spawn_process_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), **kw)


def run_eval(cmd: list[str], timeout_s: float = 240, extra_env: dict[str, str] | None = None,
             **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env={**env(), **(extra_env or {})}, timeout=timeout_s, **kw)


def stored_rows(db: Path) -> list[tuple]:
    """(problem id, idx, seed, answer, correct, status, generated tokens) of every result row, by problem."""
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return conn.execute("SELECT problem_id, idx, seed, answer, correct, status, generated_tokens "
                                "FROM results ORDER BY problem_id").fetchall()
        except sqlite3.OperationalError:  # the runner has not created the tables yet
            return []


def run_statuses(db: Path) -> list[str]:
    with sqlite3.connect(db, timeout=30) as conn:
        return [r[0] for r in conn.execute("SELECT status FROM runs")]


def claims(db: Path) -> list[tuple]:
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute("SELECT problem_id, owner FROM claims").fetchall()


def wait_for_rows(db: Path, proc: subprocess.Popen, at_least: int, timeout_s: float = 180) -> list[tuple]:
    """Poll the database until it holds `at_least` rows (the runner committed them); fails if the runner
    exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = stored_rows(db)
        if len(rows) >= at_least:
            return rows
        if proc.poll() is not None:
            raise AssertionError(f"eval exited ({proc.returncode}) before {at_least} rows: "
                                 f"{proc.stderr.read()}")
        time.sleep(0.02)  # polling the database, bounded by the deadline
    raise AssertionError(f"fewer than {at_least} rows after {timeout_s}s")


def kill(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err
