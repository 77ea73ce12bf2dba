"""The eval CLI as a user runs it: a real `python -m ttscale.cli eval` process, killed and resumed; two
strategies in one command; `ttscale report` rendered in headless Chromium.

These use the replay backend over a bank recorded from the scripted model, so they are fast and exact;
tests/evals/test_real_model.py runs the same commands on the embedded SmolLM2 model.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.evals import record_bank
from ttscale.evals.datasets import load_dataset
from ttscale.evals.report import compare, table_rows
from ttscale.evals.store import ResultStore

N_PROBLEMS = 16
ENV = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bank")
    ds = load_dataset("chain-sum", limit=N_PROBLEMS, seed=0)
    loop = asyncio.new_event_loop()
    try:
        bank, store, _ = loop.run_until_complete(record_bank(d / "bank.db", ds, "self-consistency:n=6", d / "live.db",
                                                            delay_s=0.01))
    finally:
        loop.close()
    bank.close()
    store.close()
    return d / "bank.db"


def eval_cmd(bank: Path, db: Path, *strategies: str, clock: str = "real") -> list[str]:
    cmd = [sys.executable, "-m", "ttscale.cli", "eval", "--dataset", "chain-sum", "--limit", str(N_PROBLEMS),
           "--seed", "0", "--replay", str(bank), "--clock", clock, "--db", str(db), "--concurrency", "2",
           "--no-progress"]
    for s in strategies:
        cmd += ["--strategy", s]
    return cmd


def count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def stored(db: Path) -> dict[str, tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return {r[0]: r[1:] for r in c.execute(
            "SELECT problem_id, finished_at, answer, correct, generated_tokens, sequential_tokens, result "
            "FROM results")}


def with_default_sigint(cmd: list[str]) -> list[str]:
    """`cmd` (a Python command line) with SIGINT at its default disposition: a test suite run in the background
    of a non-interactive shell (`cmd &`, as CI scripts do) has SIGINT ignored, children inherit that, and a
    Python started with SIGINT ignored never turns it into KeyboardInterrupt (the run then finishes, rc 0)."""
    reset = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    return [sys.executable, "-c", reset, *cmd[1:]]


def signal_state(pid: int) -> str:
    """The process's blocked / ignored / caught signal masks (Linux), for a failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "n/a"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def wait_for_rows(db: Path, at_least: int, proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """Poll the results table (the run's own progress record) until it holds `at_least` rows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = count_rows(db)
        if n >= at_least:
            return n
        if proc.poll() is not None:
            raise AssertionError(f"eval exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError(f"no {at_least} rows in {db} after {timeout_s}s")


def test_killed_eval_resumes_without_losing_or_repeating_a_problem(tmp_path, bank):
    strategy = "self-consistency:n=4"
    ref_db, db = tmp_path / "ref.db", tmp_path / "run.db"
    ref = subprocess.run(eval_cmd(bank, ref_db, strategy), env=ENV, check=False, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert count_rows(ref_db) == N_PROBLEMS

    # 1) SIGINT mid-run: a clean stop, every finished problem stored
    p = subprocess.Popen(with_default_sigint(eval_cmd(bank, db, strategy)), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_rows(db, 3, p)
    dispositions = signal_state(p.pid)
    p.send_signal(signal.SIGINT)
    _, errs = p.communicate(timeout=60)
    assert p.returncode == 130, (errs, dispositions, signal_state(os.getpid()))
    assert "interrupted" in errs and "re-run the same command" in errs
    first = stored(db)
    assert 3 <= len(first) < N_PROBLEMS

    # 2) re-run, then SIGKILL mid-run: nothing committed is lost, nothing stored is redone
    p = subprocess.Popen(eval_cmd(bank, db, strategy), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for_rows(db, len(first) + 3, p)
    p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    second = stored(db)
    assert len(first) + 3 <= len(second) < N_PROBLEMS
    assert {k: second[k] for k in first} == first  # rows of run 1 untouched (same finish time: not re-run)

    # 3) the same command again finishes the rest
    fin = subprocess.run(eval_cmd(bank, db, strategy), env=ENV, check=False, capture_output=True, text=True,
                         timeout=300)
    assert fin.returncode == 0, fin.stderr
    m = re.search(r"resumed: (\d+) already stored, (\d+) solved now", fin.stdout)
    assert m and int(m.group(1)) == len(second) and int(m.group(2)) == N_PROBLEMS - len(second)
    final = stored(db)
    assert len(final) == N_PROBLEMS
    assert {k: final[k] for k in second} == second

    # the final table equals the uninterrupted run's (wall time aside), problem by problem
    ref_rows = stored(ref_db)
    assert {k: v[1:5] for k, v in final.items()} == {k: v[1:5] for k, v in ref_rows.items()}
    with ResultStore(db) as a, ResultStore(ref_db) as b:
        assert table_rows(compare(a, a.runs()), wall=False) == table_rows(compare(b, b.runs()), wall=False)
        from ttscale.types import Result

        for pid in final:
            ra, rb = Result.model_validate_json(final[pid][5]), Result.model_validate_json(ref_rows[pid][5])
            assert ra.decision == rb.decision


def test_two_strategies_one_comparison_table_then_report_in_chromium(tmp_path, bank):
    db = tmp_path / "cmp.db"
    r = subprocess.run(eval_cmd(bank, db, "single", "self-consistency:n=4", clock="simulated"), env=ENV,
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("chain-sum: 16 problems"):]
    assert table.count("95% CI") == 1  # one table
    rows = [ln for ln in table.splitlines() if re.search(r"\[\d\.\d{3}, \d\.\d{3}\]", ln)]
    assert len(rows) == 2 and "single" in rows[0] and "self-consistency" in rows[1]
    with ResultStore(db) as s:
        assert len(s.runs()) == 2 and all(s.count(x.run_id) == N_PROBLEMS for x in s.runs())

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "-m", "ttscale.cli", "report", str(db), "--out", str(out)], env=ENV,
                         check=False, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    check_report(out, expected_rows=2)


def check_report(out: Path, expected_rows: int) -> None:
    """report.md/.html and the PNGs exist; headless Chromium loads every embedded plot (naturalWidth > 0)."""
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["accuracy_vs_sequential_tokens.png", "accuracy_vs_tokens.png",
                                      "pareto_front.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (out / "report.md").read_text()
    assert md.count("\n| ") >= expected_rows + 1 and "accuracy_vs_tokens.png" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "src=\"accuracy" not in html  # self-contained
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    probe = out / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{document.body.setAttribute('data-widths',"
              "[...document.images].map(i=>i.complete+':'+i.naturalWidth).join(','));});</script>")
    probe.write_text(html.replace("</body>", script + "</body>"))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         check=False, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-widths="([^"]*)"', dom)
    assert m, dom[:500]
    widths = [w.split(":") for w in m.group(1).split(",")]
    assert len(widths) == 3 and all(c == "true" and int(w) > 0 for c, w in widths)


def test_bank_record_command_and_replay_of_the_new_bank(tmp_path, bank):
    new = tmp_path / "rec.jsonl"
    rec = subprocess.run([sys.executable, "-m", "ttscale.cli", "bank", "record", "--dataset", "chain-sum", "--limit",
                          "4", "--n", "3", "--backend", f"replay:{bank}", "--out", str(new), "--db",
                          str(tmp_path / "rec.db"), "--no-progress"], env=ENV, check=False, capture_output=True,
                         text=True, timeout=300)
    assert rec.returncode == 0, rec.stderr
    info = subprocess.run([sys.executable, "-m", "ttscale.cli", "bank", "info", str(new)], env=ENV,
                          check=False, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and info.stdout.count("chain-sum-s0-") == 4
    from ttscale.evals.bank import TraceBank

    src, dst = TraceBank(bank), TraceBank(new)
    for pid in dst.problem_ids():
        assert [t.text for t in dst.traces(pid)] == [t.text for t in src.traces(pid)[:3]]
        assert all(t.token_times == sorted(t.token_times) and len(t.token_ids) == t.num_tokens
                   for t in dst.traces(pid))
    # a second bank recorded with the same --db is a run of its own: it gets every problem's traces (it used to
    # resume the first bank's run, find every problem stored, and write nothing)
    second = tmp_path / "second.jsonl"
    again = subprocess.run([sys.executable, "-m", "ttscale.cli", "bank", "record", "--dataset", "chain-sum", "--limit",
                            "4", "--n", "3", "--backend", f"replay:{bank}", "--out", str(second), "--db",
                            str(tmp_path / "rec.db"), "--no-progress"], env=ENV, check=False, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "already stored" not in again.stdout, again.stdout + again.stderr
    assert sorted(TraceBank(second).problem_ids()) == sorted(dst.problem_ids())
    # --n with --strategy sets that strategy's width (it was ignored: ffs recorded its default 4 traces)
    third = tmp_path / "ffs.jsonl"
    ffs = subprocess.run([sys.executable, "-m", "ttscale.cli", "bank", "record", "--dataset", "chain-sum", "--limit",
                          "2", "--n", "2", "--strategy", "ffs", "--backend", f"replay:{bank}", "--out", str(third),
                          "--db", str(tmp_path / "rec.db"), "--no-progress"], env=ENV, check=False,
                         capture_output=True, text=True, timeout=300)
    assert ffs.returncode == 0, ffs.stderr
    assert {len(TraceBank(third).traces(pid)) for pid in TraceBank(third).problem_ids()} == {2}


def test_report_of_unknown_run_lists_the_runs(tmp_path, bank):
    db = tmp_path / "one.db"
    subprocess.run(eval_cmd(bank, db, "single", clock="simulated"), env=ENV, check=False, capture_output=True,
                   timeout=300)
    r = subprocess.run([sys.executable, "-m", "ttscale.cli", "report", str(db), "nosuchrun"], env=ENV,
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no run matches 'nosuchrun'" in r.stderr and "single" in r.stderr


def test_baseline_as_typed_and_a_wrong_one_before_anything_runs(tmp_path, bank):
    db = tmp_path / "b.db"
    cmd = eval_cmd(bank, db, "single", "ffs:n=4", clock="simulated")
    ok = subprocess.run([*cmd, "--baseline", "ffs:n=4", "--max-tokens", "512"], env=ENV, check=False,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "vs ffs" in ok.stdout  # savings measured against the run `ffs:n=4` became
    bad_db = tmp_path / "bad.db"
    bad = subprocess.run([*eval_cmd(bank, bad_db, "single", "ffs:n=4"), "--baseline", "ffs:n=8"], env=ENV,
                         check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--baseline 'ffs:n=8' is not one of the strategies run" in bad.stderr
    assert count_rows(bad_db) == 0  # refused before any problem ran
