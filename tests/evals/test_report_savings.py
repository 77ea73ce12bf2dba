"""`ttscale report`'s headline: tokens saved against a baseline run, measured on the problems both answered.

Real strategy runs (scripted backend) are stored in a real SQLite file and read back by the report.
"""

from __future__ import annotations

import pytest

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.evals.metrics import paired_savings
from ttscale.evals.report import compare, headline, write_report
from ttscale.evals.store import ResultStore
from ttscale.strategies.registry import make_strategy
from ttscale.types import Problem


def scripts() -> list[Script]:
    return [Script(text=" ".join(["w"] * n + ["\\boxed{2}"]), delay_s=0.001) for n in (5, 10, 20, 40)]


async def solve(spec: str, pid: str):
    strat = make_strategy(spec)
    async with Context(ScriptedBackend(scripts()), seed=0) as ctx:
        res = await strat.run(Problem(id=pid, prompt="1+1?", answer="2"), ctx)
    res.correct = res.answer == "2"
    return strat, res


async def store_run(store: ResultStore, spec: str, pids: list[str]):
    results = []
    for i, pid in enumerate(pids):
        strat, res = await solve(spec, pid)
        if i == 0:
            run = store.ensure_run(dataset="toy", strategy=strat.name, spec=strat.spec,
                                   config=strat.config.model_dump(), backend="scripted", total=len(pids))
        store.add(run, i, 0, res, "2")
        results.append(res)
    return run, results


def test_paired_savings_counts_only_shared_problems():
    run = {"a": (10, 5, True), "b": (20, 8, False), "c": (999, 999, True)}
    base = {"a": (40, 10, True), "b": (60, 12, True), "d": (5, 5, True)}
    p = paired_savings(run, base)
    assert (p.problems, p.tokens, p.baseline_tokens) == (2, 30, 100)
    assert p.tokens_saved == 70 and p.tokens_saved_fraction == pytest.approx(0.7)
    assert p.sequential_saved_fraction == pytest.approx(1 - 13 / 22)
    assert p.accuracy_delta == pytest.approx(-0.5)


async def test_report_headline_is_measured_against_the_self_consistency_run(tmp_path):
    with ResultStore(tmp_path / "results.db") as store:
        ffs_run, ffs = await store_run(store, "ffs:n=4,max_tokens=1000", ["p1", "p2", "p4"])
        sc_run, sc = await store_run(store, "self-consistency:n=4,max_tokens=1000", ["p1", "p2", "p3"])
        summaries = compare(store, [ffs_run, sc_run])  # no baseline named: the self-consistency run
        by_spec = {s.run.spec: s for s in summaries}
        p = by_spec[ffs_run.spec].paired
        assert by_spec[sc_run.spec].paired is None and by_spec[ffs_run.spec].baseline == sc_run.spec
        assert p.problems == 2
        assert p.tokens == sum(r.usage.generated_tokens for r in ffs[:2])
        assert p.baseline_tokens == sum(r.usage.generated_tokens for r in sc[:2]) == 2 * (6 + 11 + 21 + 41)
        assert p.tokens_saved == p.baseline_tokens - p.tokens > 0
        # the run's own abort estimate is reported beside, never as, the measured saving
        estimate = sum(r.usage.saved_tokens for r in ffs)
        (line,) = headline(summaries)
        assert f"{p.tokens_saved:,} generated tokens saved" in line and f"by aborts: {estimate:,}" in line
        files = write_report(store, [ffs_run, sc_run], tmp_path / "report")
        md = files.markdown.read_text()
        assert "Savings against the baseline" in md and line in md
        assert md.index("Savings against the baseline") < md.index("| run |")
        assert "Savings against the baseline" in files.html.read_text()


def test_a_baseline_matching_runs_on_two_backends_is_ambiguous(tmp_path):
    """One spec run on two backends (or models): `--baseline SPEC` named both and silently took one."""
    import pytest

    from ttscale.errors import ConfigError
    from ttscale.evals.report import compare
    from ttscale.evals.store import ResultStore

    with ResultStore(tmp_path / "r.db") as store:
        runs = [store.ensure_run(dataset="toy", strategy="single", spec="single", config={"backend": b},
                                 backend=b, total=1) for b in ("engine", "vllm")]
        with pytest.raises(ConfigError, match="matches 2 runs") as e:
            compare(store, runs, baseline="single")
        assert all(r.run_id in str(e.value) for r in runs)
        assert compare(store, runs, baseline=runs[1].run_id)[0].baseline == "single"
