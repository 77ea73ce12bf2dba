"""`ttscale report`: width sweeps drawn as curves, maj@k / pass@k tables, honest wall time for replays,
and the HTML page as headless Chromium renders it.

Runs are real eval runs (the runner over the scripted model, and a replay of a bank recorded from it)
stored in a real SQLite file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.evals import record_bank, scripted_answer
from ttscale.backends.scripted import ScriptedBackend
from ttscale.evals.datasets import load_dataset
from ttscale.evals.metrics import summarize
from ttscale.evals.replay import ReplayBackend
from ttscale.evals.report import (
    HEADERS,
    RunSummary,
    compare,
    draw_accuracy,
    run_width,
    sweep_key,
    sweep_label,
    sweeps,
    table_rows,
    write_report,
)
from ttscale.evals.runner import evaluate
from ttscale.evals.store import ResultStore, RunInfo
from ttscale.types import Result, Usage

WIDTHS = (1, 2, 4)


async def _runs(tmp_path: Path) -> tuple[ResultStore, list[RunInfo]]:
    """A self-consistency width sweep, an FFS run and a single run on one dataset, then a replay run."""
    ds = load_dataset("chain-sum", limit=4, seed=0)
    store = ResultStore(tmp_path / "results.db")
    specs = [f"self-consistency:n={n},max_tokens=64" for n in WIDTHS] + ["ffs:n=2,max_tokens=64", "single"]
    backend = ScriptedBackend(lambda r, i: scripted_answer(r, i, 0.0005))
    out = await evaluate(ds, specs, backend, store, backend_spec="scripted", concurrency=2)
    bank, live, _ = await record_bank(tmp_path / "bank.db", ds, "self-consistency:n=4", tmp_path / "live.db",
                                      delay_s=0.0005)
    live.close()
    replay = ReplayBackend(bank.path)
    out += await evaluate(ds, ["self-consistency:n=4"], replay, store, backend_spec=f"replay:{bank.path}",
                          concurrency=2)
    await replay.close()
    return store, [o.run for o in out]


def _run(spec: str, config: dict, meta: dict | None = None) -> RunInfo:
    name = spec.split(":")[0]
    cfg = {"strategy": name, "config": config, "backend": "scripted", "seed": 0}
    return RunInfo(f"r-{spec}-{sorted(config.items())}", "toy", name, spec, "h", cfg, "scripted", 3, "done", 0.0,
                   meta or {})


def test_runs_differing_only_in_width_are_one_sweep():
    a, b = _run("ffs:n=2", {"n": 2}), _run("ffs:n=8", {"n": 8})
    other_temp = _run("ffs:n=4,temperature=0.2", {"n": 4, "temperature": 0.2})
    single = _run("single", {})
    assert sweep_key(a) == sweep_key(b) != sweep_key(other_temp)
    assert sweep_key(single) == f"run|{single.run_id}" and run_width(single) is None
    assert (run_width(a), run_width(_run("short-m:k=16,m=3", {"k": 16, "m": 3}))) == (2, 16)
    assert sweep_label(other_temp) == "ffs:temperature=0.2 (toy)"
    # the sweep stored with the run by `--n 1,2,4` (runner.sweep_meta) wins over the config comparison
    meta = {"sweep": {"key": "ffs:n=*,temperature=0.2", "field": "n", "value": 4}}
    tagged = _run("ffs:n=4,temperature=0.2", {"n": 4, "temperature": 0.2}, meta)
    assert sweep_key(tagged) == "toy|ffs:n=*,temperature=0.2" and run_width(tagged) == 4
    assert sweep_label(tagged) == "ffs:n=*,temperature=0.2 (toy)"


@settings(max_examples=60, deadline=None)
@given(configs=st.lists(st.tuples(st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([0.2, 0.7]),
                                  st.sampled_from([64, 128])), min_size=1, max_size=8))
def test_sweeps_partition_runs_by_everything_but_width(configs):
    """Every run is in exactly one sweep; two runs share one iff they differ at most in `n`; widths ascend."""
    runs = [_run(f"self-consistency:n={n},temperature={t},max_tokens={m}-{i}",
                 {"n": n, "temperature": t, "max_tokens": m}) for i, (n, t, m) in enumerate(configs)]
    summaries = [RunSummary(r, summarize(r.spec, [True], [10], [5], [0.1])) for r in runs]
    groups = sweeps(summaries)
    assert sorted(s.run.run_id for g in groups for s in g.runs) == sorted(r.run_id for r in runs)
    for g in groups:
        assert g.widths == sorted(g.widths)
        assert len({(r.run.config["config"]["temperature"], r.run.config["config"]["max_tokens"])
                    for r in g.runs}) == 1
    assert len(groups) == len({(t, m) for _, t, m in configs})


async def test_report_draws_sweeps_as_curves_and_shows_at_k(tmp_path):
    store, runs = await _runs(tmp_path)
    with store:
        summaries = compare(store, runs)
        groups = sweeps(summaries)
        sc = next(g for g in groups if len(g.runs) > 1)
        assert sc.widths == list(WIDTHS) and sc.label.startswith("self-consistency:max_tokens=64")
        assert sum(len(g.runs) for g in groups) == len(runs) and len(groups) == len(runs) - len(WIDTHS) + 1

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        draw_accuracy(ax, summaries, "mean_tokens")
        lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 1]
        assert len(lines) == 1 and list(lines[0].get_xdata()) == [s.summary.mean_tokens for s in sc.runs]
        assert sorted(t.get_text() for t in ax.texts) == [f"n={n}" for n in WIDTHS]
        plt.close(fig)

        # maj@k / pass@k: k = 1, 2, 4 up to each run's width; pass@k grows with k
        for s in summaries:
            assert sorted(s.maj_at_k) == sorted(s.pass_at_k) == [k for k in WIDTHS if k <= (run_width(s.run) or 1)]
            values = [s.pass_at_k[k] for k in sorted(s.pass_at_k)]
            assert values == sorted(values)
        files = write_report(store, runs, tmp_path / "report")
        md = files.markdown.read_text()
        assert "## maj@k and pass@k" in md and "## Width sweeps" in md
        sweep_rows = [ln for ln in md.splitlines() if ln.startswith("| self-consistency:max_tokens=64")]
        assert [r.split(" | ")[1] for r in sweep_rows] == [str(n) for n in WIDTHS]
    check_html_in_chromium(files.html, n_runs=len(runs))


def check_html_in_chromium(page: Path, n_runs: int) -> None:
    """Headless Chromium loads the page: every plot decodes (naturalWidth > 0) and its pixels are not one
    colour; the maj@k/pass@k table has a row per run and metric with numbers for k=1; the sweep table is there."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    probe = page.with_name("probe.html")
    script = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images].map(img => {
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const px = g.getImageData(0, 0, c.width, c.height).data; const colours = new Set();
        for (let i = 0; i < px.length && colours.size < 4; i += 4 * 97)
          colours.add(px[i] + ',' + px[i+1] + ',' + px[i+2]);
        return {id: img.id, complete: img.complete, width: img.naturalWidth, colours: colours.size};
      });
      const table = id => { const t = document.getElementById(id); return t === null ? null :
        [...t.querySelectorAll('tr')].map(r => [...r.children].map(c => c.textContent)); };
      const out = document.createElement('pre'); out.id = 'probe';
      out.textContent = JSON.stringify({imgs, atk: table('at-k'), sweeps: table('sweeps'), runs: table('runs')});
      document.body.appendChild(out);
    });</script>"""
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         check=False, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert m, dom[-800:]
    got = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert [i["id"] for i in got["imgs"]] == ["accuracy_vs_tokens", "accuracy_vs_sequential_tokens", "pareto_front"]
    assert all(i["complete"] and i["width"] > 0 and i["colours"] > 1 for i in got["imgs"]), got["imgs"]
    head, *rows = got["atk"]
    assert head[:4] == ["run", "strategy", "dataset", "metric"] and "k=1" in head and "k=4" in head
    assert len(rows) == 2 * n_runs and {r[3] for r in rows} == {"maj@k", "pass@k"}
    assert all(re.fullmatch(r"\d\.\d{3}", r[head.index("k=1")]) for r in rows)
    assert got["sweeps"] is not None and [r[1] for r in got["sweeps"][1:]] == [str(n) for n in WIDTHS]
    assert got["runs"][0] == HEADERS and len(got["runs"]) == n_runs + 1


async def test_replay_reports_recorded_wall_time_not_its_own(tmp_path):
    store, runs = await _runs(tmp_path)
    with store:
        replayed = runs[-1]
        bank_rows = store.rows(replayed.run_id)
        for r in bank_rows:
            u = r.result.usage
            assert u.recorded_wall_time_s is not None and u.recorded_wall_time_s > 0
        summaries = compare(store, runs)
        rep = next(s for s in summaries if s.run.run_id == replayed.run_id)
        assert rep.wall_source == "recorded"
        recorded_mean = sum(r.result.usage.recorded_wall_time_s for r in bank_rows) / len(bank_rows)
        assert rep.summary.mean_wall_s == pytest.approx(recorded_mean)
        wall = table_rows([rep])[0][HEADERS.index("mean wall s")]
        assert wall == f"{recorded_mean:.2f} (recorded)"
        live = next(s for s in summaries if s.run.backend == "scripted")
        assert live.wall_source == "measured" and "recorded" not in table_rows([live])[0][HEADERS.index("mean wall s")]

        # a replay row stored without the recorded time (older versions) says n/a, not its replay time
        old = store.ensure_run(dataset="toy", strategy="single", spec="single", config={"v": 0},
                               backend="replay:/old/bank.db#x", total=1)
        store.add(old, 0, 0, Result(problem_id="p", answer="1", strategy="single", correct=True,
                                    usage=Usage(generated_tokens=5, sequential_tokens=5, wall_time_s=0.01)), "1")
        (s,) = compare(store, [store.run(old.run_id)])
        assert s.wall_source == "n/a" and table_rows([s])[0][HEADERS.index("mean wall s")] == "n/a (replay)"
        md = write_report(store, [store.run(old.run_id), replayed], tmp_path / "r2").markdown.read_text()
        assert "n/a (replay)" in md and "(recorded)" in md and "recorded timeline" in md


def test_a_run_with_nothing_answered_shows_no_accuracy_cost_or_point():
    """All problems errored: accuracy, CI and the per-answer means are '-' in tables and None in results.json,
    and the plots leave the run out (drawn at accuracy 0 and 0 tokens it sat on the Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ttscale.evals.outputs import run_metrics

    empty = RunSummary(_run("single", {"n": 1}), summarize("single", [], [], [], []), errors=3)
    answered = RunSummary(_run("ffs:n=2", {"n": 2}), summarize("ffs", [True, False], [10, 20], [5, 9], [1.0, 2.0]))
    row = table_rows([empty])[0]
    assert row[HEADERS.index("accuracy")] == row[HEADERS.index("95% CI")] == "-"
    assert row[HEADERS.index("mean tokens")] == "-" and row[HEADERS.index("errors")] == "3"
    m = run_metrics(empty)
    assert (m.accuracy, m.accuracy_ci_low, m.accuracy_ci_high, m.mean_total_tokens, m.mean_wall_time_s) == \
        (None, None, None, None, None) and m.n_errors == 3
    assert run_metrics(answered).accuracy_ci_low is not None
    fig, ax = plt.subplots()
    draw_accuracy(ax, [empty, answered], "mean_tokens", front=True)
    xs = [x for ln in ax.get_lines() for x in ln.get_xdata()]
    assert xs and 0.0 not in xs and set(xs) == {15.0}
    plt.close(fig)
