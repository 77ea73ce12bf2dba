"""benchmarks/study.py end to end on a tiny random-weight model: bank, replay, live, report, then a rerun
that resumes from the store and the bank and generates nothing."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from benchmarks.study import (
    StudyConfig,
    comparisons,
    live_entries,
    replay_entries,
    run_study,
    task_sets,
    widths,
)
from ttscale.errors import ConfigError
from ttscale.testing import build_tiny_model

TASK = "basic-arithmetic"


def _snapshot(db: Path) -> list[str]:
    """Every stored result and recorded trace (run bookkeeping such as `updated_at` left out)."""
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return sorted(repr((t, *row)) for t in sorted(tables & {"results", "traces", "problems"})
                      for row in conn.execute(f"SELECT * FROM {t}"))


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("study-model") / "qwen2", arch="qwen2", seed=3)


def test_widths_and_entries_fit_the_bank():
    assert widths(32) == [1, 2, 4, 8, 16, 32] and widths(4) == [1, 2, 4] and widths(6) == [1, 2, 4, 6]
    cfg = StudyConfig(n=4, max_tokens=8)
    labels = [e.label for e in replay_entries(cfg, Path("judge.json"))]
    assert len(labels) == len(set(labels)) >= 14
    for e in replay_entries(cfg, Path("judge.json")):
        assert (e.config.get("n") or e.config.get("k") or 1) <= 4, e  # never asks the bank for more traces
        e.build()  # every configuration is valid
    assert {e.label for e in live_entries(cfg)} >= {"PDR~SC@8", "SR~SC@16", "ATTS", "Hogwild-W4"}


def test_bad_phase_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown phase"):
        asyncio.run(run_study(StudyConfig(work=tmp_path), ["bnak"]))  # type: ignore[list-item]


def test_study_end_to_end_then_rerun_generates_nothing(tmp_path, tiny_qwen2):
    spec = f"engine:{tiny_qwen2}?device=cpu&dtype=float32"
    cfg = StudyConfig(backend=spec, draft_backend=spec, tasks=[TASK], problems=3, judge_problems=4, n=4,
                      max_tokens=12, top_logprobs=5, conf_window=4, judge_prefix_tokens=4, concurrency=4,
                      live_problems=2, fidelity=True, work=tmp_path / "work", out=tmp_path / "out",
                      live_strategies=["PDR~SC@8", "SR~SC@8", "ParaThinker-text@4", "Hogwild-W2", "ATTS",
                                       "SC@4-live"])
    files = asyncio.run(run_study(cfg, ["bank", "replay", "live", "report"]))
    result = json.loads((cfg.out / f"study_{TASK}.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}

    replayed = [r for r in rows.values() if r["phase"] == "replay" and not r["label"].endswith("@live-problems")]
    assert len(replayed) >= 14, sorted(rows)
    for r in replayed:
        assert r["problems"] == 3 and r["errors"] == 0, r
        assert 0.0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1.0
        assert r["mean_total_tokens"] > 0 and 0 < r["mean_sequential_tokens"] <= r["mean_total_tokens"]
        assert r["wall_source"].startswith("recorded") and r["mean_wall_s"] > 0
    # Self-consistency at width k reads exactly k complete traces of <= 12 tokens each.
    for k in (1, 2, 4):
        assert rows[f"SC@{k}"]["mean_total_tokens"] <= 12 * k
    assert rows["SC@4"]["mean_total_tokens"] > rows["SC@1"]["mean_total_tokens"]
    live = {k: r for k, r in rows.items() if r["phase"] == "live"}
    assert {"PDR~SC@8", "SR~SC@8", "ParaThinker-text@4", "ATTS", "SC@4-live"} <= set(live), (
        sorted(live), result["skipped"])
    assert all(r["problems"] == 2 for r in live.values())
    assert result["fidelity"] is not None and result["fidelity"]["replayed"]["problems"] == 2

    judge = result["judge"]  # trained on problems disjoint from the eval ones, or skipped with a reason
    assert set(judge["judge_problems"]).isdisjoint(result["eval_problems"])
    assert len(judge["judge_problems"]) == 4 and len(result["eval_problems"]) == 3
    assert ("DeepPrune@4" in rows) != ("skipped" in judge)
    assert result["bank"]["recording_time"]["problems"] == 7
    assert isinstance(comparisons([]), list)

    import matplotlib.image

    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == 2 and all(matplotlib.image.imread(p).shape[0] > 100 for p in pngs)
    md = (cfg.out / "study.md").read_text()
    assert f"### {TASK}" in md and "| SC@4 | replay |" in md

    before = _snapshot(cfg.work / "results.db"), _snapshot(cfg.work / f"bank_{TASK}.db")
    asyncio.run(run_study(cfg, ["bank", "replay", "live", "report"]))
    after = _snapshot(cfg.work / "results.db"), _snapshot(cfg.work / f"bank_{TASK}.db")
    assert before == after  # nothing generated, replayed or stored again
    assert json.loads((cfg.out / f"study_{TASK}.json").read_text())["rows"] == result["rows"]


def test_eval_and_judge_problems_are_disjoint():
    cfg = StudyConfig(tasks=[TASK], problems=5, judge_problems=3)
    everything, ev, judge = task_sets(cfg, TASK)
    assert len(everything) == 8 and len(ev) == 5 and len(judge) == 3
    assert {p.id for p in ev.problems}.isdisjoint({p.id for p in judge.problems})
    assert {p.prompt for p in ev.problems}.isdisjoint({p.prompt for p in judge.problems})


def test_probe_measures_single_sample_accuracy_per_task(tmp_path, tiny_qwen2):
    spec = f"engine:{tiny_qwen2}?device=cpu&dtype=float32"
    cfg = StudyConfig(backend=spec, probe_tasks=[TASK, "chain-sum"], probe_problems=2, max_tokens=8,
                      concurrency=4, work=tmp_path / "work", out=tmp_path / "out")
    (path,) = asyncio.run(run_study(cfg, ["probe"]))
    tasks = json.loads(path.read_text())["tasks"]
    assert set(tasks) == {TASK, "chain-sum"}
    for row in tasks.values():
        assert row["problems"] == 2 and row["errors"] == 0 and 0 < row["mean_tokens"] <= 8
        assert row["in_range"] == (0.15 <= row["accuracy"] <= 0.80)
