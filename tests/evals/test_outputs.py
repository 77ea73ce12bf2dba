"""`ttscale eval --output-path` files checked against their schema (ttscale/evals/outputs.py) and the store,
and maj@k / pass@k in `ttscale report` on a hand-built store.

The eval runs as a real subprocess on the bundled smoke dataset, replaying a bank recorded from the scripted
model (fast and exact); the report test builds its store by hand so the expected values are counted here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.fixtures.evals import record_bank
from ttscale.evals.datasets import load_dataset
from ttscale.evals.metrics import k_values, sample_k_metrics
from ttscale.evals.outputs import RESULTS_FILE, SAMPLES_FILE, ResultsFile, SampleRecord
from ttscale.evals.report import HEADERS, compare, table_rows, write_report
from ttscale.evals.store import ResultStore
from ttscale.types import BranchStatus, Result, Trace, Usage

ENV = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
N = 4


@pytest.fixture(scope="module")
def smoke_bank(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bank")
    loop = asyncio.new_event_loop()
    try:
        bank, store, _ = loop.run_until_complete(
            record_bank(d / "bank.db", load_dataset("smoke"), f"self-consistency:n={N}", d / "live.db"))
    finally:
        loop.close()
    bank.close()
    store.close()
    return d / "bank.db"


def test_a_smaller_limit_after_a_larger_run_reports_and_writes_only_its_problems(smoke_bank, tmp_path):
    """A run keeps what an earlier, larger --limit stored (a rerun resumes it), but an invocation's table
    and output files are about the problems it ran: the first `limit` problems, their total, their samples."""
    out, db, limit = tmp_path / "out", tmp_path / "results.db", 3
    base = [sys.executable, "-m", "ttscale.cli", "eval", "--dataset", "smoke", "--replay", str(smoke_bank),
            "--db", str(db), "--no-progress", "--strategy", f"self-consistency:n={N}"]
    full = subprocess.run(base, check=False, capture_output=True, text=True, env=ENV, timeout=300)
    assert full.returncode == 0, full.stderr
    ds = load_dataset("smoke")
    assert len(ds) > limit
    proc = subprocess.run([*base, "--limit", str(limit), "--output-path", str(out)], check=False,
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{limit} already stored" in proc.stdout
    assert f"{limit}/{limit}" in proc.stdout and f"/{len(ds)}" not in proc.stdout
    results = ResultsFile.model_validate_json((out / RESULTS_FILE).read_text())
    samples = [SampleRecord.model_validate_json(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert [s.problem_id for s in samples] == [p.id for p in ds.problems[:limit]]
    (m,) = results.results.values()
    assert m.n_problems == m.n_answered == limit
    assert m.accuracy == pytest.approx(sum(bool(s.correct) for s in samples) / limit)
    with ResultStore(db) as store:
        (run,) = store.runs()
        assert store.count(run.run_id) == len(ds)  # the larger run's rows are all still there


def test_eval_output_path_writes_the_documented_schema(smoke_bank, tmp_path):
    out, db = tmp_path / "out", tmp_path / "results.db"
    cmd = [sys.executable, "-m", "ttscale.cli", "eval", "--dataset", "smoke", "--replay", str(smoke_bank),
           "--db", str(db), "--no-progress", "--strategy", f"self-consistency:n={N}", "--strategy", "single",
           "--output-path", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr

    results = ResultsFile.model_validate_json((out / RESULTS_FILE).read_text())
    lines = (out / SAMPLES_FILE).read_text().splitlines()
    samples = [SampleRecord.model_validate_json(line) for line in lines]
    raw = json.loads((out / RESULTS_FILE).read_text())
    assert {"results", "configs", "versions", "n-samples"} <= set(raw)  # lm-eval's top-level names
    assert {"doc_id", "doc", "target", "resps", "filtered_resps", "acc"} <= set(json.loads(lines[0]))

    ds = load_dataset("smoke")
    problems = {p.id: p for p in ds.problems}
    assert len(results.results) == 2
    assert len(samples) == 2 * len(ds) == sum(results.n_samples.values())
    with ResultStore(db) as store:
        runs = {r.run_id: r for r in store.runs()}
    assert set(results.configs) == set(runs) == set(results.results)
    for run_id, cfg in results.configs.items():
        assert (cfg.dataset, cfg.spec, cfg.config, cfg.model) == (
            runs[run_id].dataset, runs[run_id].spec, runs[run_id].config, runs[run_id].backend)
        assert cfg.model.startswith("replay:") and cfg.status == "done"
        mine = [s for s in samples if s.run_id == run_id]
        m = results.results[run_id]
        assert m.n_problems == m.n_answered == m.n_graded == len(ds) and m.n_errors == 0
        assert m.accuracy == pytest.approx(sum(s.correct for s in mine) / len(mine))
        assert m.accuracy_ci_low <= m.accuracy <= m.accuracy_ci_high
        assert m.mean_total_tokens == pytest.approx(sum(s.usage.generated_tokens for s in mine) / len(mine))
        assert m.mean_sequential_tokens == pytest.approx(
            sum(s.usage.sequential_tokens for s in mine) / len(mine))
        assert m.total_wall_time_s == pytest.approx(sum(s.wall_time_s for s in mine))
        n = len(mine[0].traces)
        assert n == (N if cfg.strategy == "self-consistency" else 1)
        ks = sorted(int(k) for k in m.pass_at_k)
        assert ks == sorted(int(k) for k in m.maj_at_k) == ([1, 2, 4] if n == N else [1])
        grades = [[t.correct for t in s.traces] for s in mine]
        assert m.pass_at_k["1"] == pytest.approx(sum(sum(g) / len(g) for g in grades) / len(grades))
        assert m.pass_at_k[str(n)] == pytest.approx(sum(any(g) for g in grades) / len(grades))
        maj_n = [majority_correct(s) for s in mine]
        assert m.maj_at_k[str(n)] == pytest.approx(sum(maj_n) / len(maj_n))
        for s in mine:
            p = problems[s.problem_id]
            assert ds.problems[s.doc_id].id == s.problem_id
            assert (s.prompt, s.target, s.doc["prompt"]) == (p.prompt, p.answer, p.prompt)
            assert s.acc == int(s.correct) and s.correct == ds.grade(p, s.answer) and s.error is None
            assert s.resps == [t.text for t in s.traces] and s.filtered_resps == [t.answer for t in s.traces]
            for t in s.traces:
                if p.kind == "math":
                    assert t.answer == re.findall(r"\\boxed\{([^}]*)\}", t.text)[-1]
                assert t.correct == ds.grade(p, t.answer)
            assert s.usage.generated_tokens == sum(t.num_tokens for t in s.traces)


def majority_correct(s: SampleRecord) -> float:
    """Whether the most common extracted answer is right (a tie: the mean over the tied answers, a uniformly
    drawn winner); no answers: wrong."""
    votes = Counter(a for a in s.filtered_resps if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, c in votes.items() if c == top]
    return sum(bool(s.traces[s.filtered_resps.index(a)].correct) for a in tied) / len(tied)


def _trace(i: int, answer: str) -> Trace:
    return Trace(id=f"b{i}", text=f"\\boxed{{{answer}}}", num_tokens=3, status=BranchStatus.finished,
                 answer=answer, meta={"correct": answer == "5"})


def test_report_shows_maj_and_pass_at_k_on_a_hand_built_store(tmp_path):
    # Two problems, reference 5, four traces each; maj@k is the mean vote over every k of the 4 traces, a tie
    # counting as a drawn winner. p0: 5 5 7 7 -> maj@1 2/4; maj@2: {5,5} right, four {5,7} ties half right,
    # {7,7} wrong: 3/6; maj@4 a 5-7 tie, 1/2. p1: 7 5 7 9 -> maj@1 1/4; maj@2: {7,5} twice and {5,9} are ties
    # half right, the other three wrong: 1.5/6; maj@4: 7 twice, wrong.
    # A ParaThinker-style summary trace (role "summary") is no sample: left out, though it says 5.
    answers = {"p0": ["5", "5", "7", "7"], "p1": ["7", "5", "7", "9"]}
    store = ResultStore(tmp_path / "r.db")
    run = store.ensure_run(dataset="hand", strategy="self-consistency", spec="self-consistency:n=4",
                           config={"n": 4}, backend="hand", total=2)
    for i, (pid, ans) in enumerate(answers.items()):
        summary = _trace(len(ans), "5").model_copy(update={"id": "summary", "meta": {"correct": True,
                                                                                     "role": "summary"}})
        traces = [*(_trace(j, a) for j, a in enumerate(ans)), summary]
        top = Counter(ans).most_common(1)[0][0]
        store.add(run, i, i, Result(problem_id=pid, answer=top, strategy="self-consistency", traces=traces,
                                    correct=top == "5",
                                    usage=Usage(generated_tokens=12, sequential_tokens=3)),
                  "5")
    [s] = compare(store, store.runs())
    assert s.maj_at_k == pytest.approx({1: 0.375, 2: (0.5 + 0.25) / 2, 4: 0.25})
    # pass@k, c right of n=4: p0 c=2, p1 c=1. pass@1 = (2/4 + 1/4)/2 = maj@1;
    # pass@2 = (1 - 1/6 + 1 - 3/6)/2; pass@4 = 1.
    assert s.pass_at_k == pytest.approx({1: 0.375, 2: (5 / 6 + 0.5) / 2, 4: 1.0})
    row = dict(zip(HEADERS, table_rows([s])[0], strict=True))
    assert row["maj@k"] == "k=1 0.375, k=2 0.375, k=4 0.250"
    assert row["pass@k"] == "k=1 0.375, k=2 0.667, k=4 1.000"
    files = write_report(store, store.runs(), tmp_path / "report")
    assert row["pass@k"] in files.markdown.read_text() and row["maj@k"] in files.html.read_text()
    store.close()

    proc = subprocess.run([sys.executable, "-m", "ttscale.cli", "report", "--db", str(tmp_path / "r.db"),
                           "--out", str(tmp_path / "cli-report")], check=False, capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "maj@k" in proc.stdout and "pass@k" in proc.stdout and "k=2 0.667" in proc.stdout


def test_k_values_and_k_metrics_edges():
    assert [k_values(n) for n in (1, 2, 3, 6, 8)] == [[1], [1, 2], [1, 2, 3], [1, 2, 4, 6], [1, 2, 4, 8]]
    assert sample_k_metrics([]) == ({}, {}) and sample_k_metrics([([], [])]) == ({}, {})
    # k runs up to the fewest traces any problem has: 3 here, though one problem has 5.
    maj, pas = sample_k_metrics([(["1", "2", "2"], [False, True, True]), (["3"] * 5, [True] * 5)])
    assert sorted(maj) == sorted(pas) == [1, 2, 3]
    # problem 0 over its 3 traces: maj@1 2/3; maj@2 {1,2} twice a tie (half right), {2,2} right: 2/3; maj@3 right
    assert maj == pytest.approx({1: 5 / 6, 2: 5 / 6, 3: 1.0}) and maj[1] == pytest.approx(pas[1])
    with pytest.raises(ValueError, match="same length"):
        sample_k_metrics([(["1"], [True, False])])


def test_bad_output_paths_are_bad_input_named_before_any_compute(smoke_bank, tmp_path):
    """An output path that is a file where a folder is written (or the other way round), or a database path
    that does not exist: one line naming it, exit 2 — for eval before anything runs (it used to fail after
    the whole compute, with a hint to re-run that failed the same way)."""
    afile, db = tmp_path / "afile", tmp_path / "r.db"
    afile.write_text("x")

    def ttscale(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ttscale.cli", *args], check=False, capture_output=True,
                              text=True, env=ENV, timeout=300)

    base = ["eval", "--dataset", "smoke", "--limit", "1", "--replay", str(smoke_bank), "--db", str(db),
            "--no-progress", "--strategy", "single"]
    bad = ttscale(*base, "--output-path", str(afile))
    assert bad.returncode == 2 and "--output-path" in bad.stderr and "is a file" in bad.stderr, bad.stderr
    assert "solved now" not in bad.stdout and not db.exists()  # refused before the results database is opened
    assert ttscale(*base).returncode == 0
    for args, words in ((["report", "--db", str(db), "--out", str(afile)], "--out"),
                        (["report", str(tmp_path / "nosuch.db")], "nosuch.db"),
                        (["report", str(db), "--db", str(tmp_path / "other.db")], "give one results database"),
                        (["export", "--db", str(db), "--format", "json", "--output", str(tmp_path)], "is a folder"),
                        (["export", "--db", str(db), "--output", str(afile)], "is a file"),
                        (["export", "--db", str(db), "--output", str(afile / "sub")], "--output")):
        r = ttscale(*args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
