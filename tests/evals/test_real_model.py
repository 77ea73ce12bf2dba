"""Acceptance on the embedded model: `ttscale eval` on gsm-symbolic with self-consistency, live progress,
every result stored, then `ttscale report` rendered in headless Chromium.

Backend: `engine` (our engine on CPU with the bundled SmolLM2-135M-Instruct). Kept small for CI (3
problems, 48 tokens per branch); the full 20-problem command is in docs/datasets.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.evals.test_cli import check_report
from ttscale.evals.store import ResultStore

LIMIT = 3


@pytest.mark.slow
def test_eval_gsm_symbolic_on_embedded_model_then_report(tmp_path):
    db = tmp_path / "results.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    cmd = [sys.executable, "-m", "ttscale.cli", "eval", "--dataset", "gsm-symbolic", "--limit", str(LIMIT),
           "--strategy", "self-consistency:n=4", "--max-tokens", "48", "--backend", "engine", "--db", str(db),
           "--concurrency", "2"]
    r = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # live progress: the bar was redrawn while problems finished (done/total, accuracy, tokens/s)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", r.stdout)
    states = re.findall(r"(\d)/3 acc (\S+)[^\n]*? (\d+) tok/s", plain)
    assert {s[0] for s in states} >= {"0", str(LIMIT)}, plain[-2000:]
    assert any(int(tps) > 0 for _, _, tps in states)
    with ResultStore(db) as store:
        (run,) = store.runs()
        rows = store.rows(run.run_id)
        assert len(rows) == LIMIT and run.spec == "self-consistency:max_tokens=48,n=4"
        for row in rows:
            traces = row.result.traces
            assert len(traces) == 4 and all(t.status.value == "finished" and 0 < t.num_tokens <= 48 for t in traces)
            assert row.generated_tokens == sum(t.num_tokens for t in traces)
            assert row.correct is not None and row.reference
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "-m", "ttscale.cli", "report", "--db", str(db), "--out", str(out)],
                         env=env, check=False, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    check_report(out, expected_rows=1)
