"""Comparison tables and reports: Markdown + a self-contained HTML page with embedded PNG plots.

Plots (matplotlib, Agg): accuracy vs mean generated tokens per problem (95% CI bars), accuracy vs mean
sequential tokens, and the Pareto front over total tokens. Runs of one width
sweep (the same strategy and settings at several widths `n`: `ttscale eval --n 1,2,4,8`, or runs that
differ only in `n`) are one line with a marker per width; other runs are single points. The PNG files are
written beside the reports too. The table has maj@k and pass@k beside accuracy, from the traces the runner
graded, and a table of its own per k.

Wall time is what the run measured, except for replays (`--replay BANK`): replaying is CPU-side re-use of
recorded traces, so a replay reports the time its problems took on the traces' recorded timeline (marked
"recorded"), or "n/a" for rows stored without it, never the replay's own run time.
"""

from __future__ import annotations

import base64
import functools
import html
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

from ttscale.evals.metrics import (
    PairedSavings,
    Savings,
    Summary,
    paired_savings,
    pareto_front,
    sample_k_metrics,
    savings,
    summarize,
)
from ttscale.evals.store import ResultStore, Row, RunInfo, config_hash

WallSource = Literal["measured", "recorded", "n/a"]


@dataclass
class RunSummary:
    run: RunInfo
    summary: Summary
    savings: Savings | None = None
    paired: PairedSavings | None = None  # measured against the baseline run on the problems both answered
    baseline: str | None = None  # the baseline run's spec
    errors: int = 0  # problems that failed (stored as errors): outside accuracy and the token means
    maj_at_k: dict[int, float] = field(default_factory=dict)  # k -> maj@k over the run's graded traces
    pass_at_k: dict[int, float] = field(default_factory=dict)  # k -> unbiased pass@k
    wall_source: WallSource = "measured"  # where `summary`'s wall times come from (see the module docstring)


def run_k_metrics(rows: Sequence[Row]) -> tuple[dict[int, float], dict[int, float]]:
    """(maj@k, pass@k) of a run from the graded traces of its answered problems (`rows`).

    Only traces that are samples count (`Trace.is_sample`: ParaThinker's summary, written over its paths, is
    none). Computable when every answered problem has such traces, graded by the runner
    (`trace.meta["correct"]`); else both are empty (rows stored before traces were graded, problems without
    a reference).
    """
    samples = []
    for r in rows:
        traces = [t for t in r.result.traces if t.is_sample]
        grades = [t.meta.get("correct") for t in traces]
        if not grades or any(g is None for g in grades):
            return {}, {}
        samples.append(([t.answer for t in traces], [bool(g) for g in grades]))
    return sample_k_metrics(samples)


def is_replay(run: RunInfo) -> bool:
    """Whether the run served recorded traces (`ttscale eval --replay`) instead of a model."""
    return run.backend.startswith("replay")


def row_wall_time(run: RunInfo, row: Row) -> float:
    """A problem's wall time: measured, or for a replay its time on the recorded timeline when stored
    (rows of older versions have only the replay's own time: `wall_times` then says `n/a`)."""
    recorded = row.result.usage.recorded_wall_time_s if is_replay(run) else None
    return row.wall_time_s if recorded is None else float(recorded)


def wall_times(run: RunInfo, rows: Sequence[Row]) -> tuple[list[float], WallSource]:
    """Per-problem wall times (`row_wall_time`) and what they are: `measured` for a live run, `recorded` for
    a replay that stored its recorded-timeline times, `n/a` for one that did not (tables show n/a)."""
    times = [row_wall_time(run, r) for r in rows]
    if not is_replay(run):
        return times, "measured"
    if not rows or any(r.result.usage.recorded_wall_time_s is None for r in rows):
        return times, "n/a"
    return times, "recorded"


def run_summary(run: RunInfo, rows: Sequence[Row]) -> Summary:
    """Metrics over the answered problems (`rows`); errored ones are counted apart (`RunSummary.errors`).

    Wall times as `wall_times` gives them (a replay's recorded time, not its own run time).
    """
    wall, _ = wall_times(run, rows)
    return summarize(
        run.spec, [r.correct for r in rows], [r.generated_tokens for r in rows], [r.sequential_tokens for r in rows],
        wall, [r.saved_tokens for r in rows],
    )


# ------------------------------------------------------------------------------------------------ sweeps

@functools.cache
def width_field(strategy: str) -> str | None:
    """The config field that is a strategy's width (`StrategyConfig.width_field`: `n`, `k` for short-m,
    `workers` for Hogwild, ...); `n` for a name the registry does not know (runs from other versions)."""
    from ttscale.errors import TTScaleError
    from ttscale.strategies.registry import make_strategy

    try:
        return type(make_strategy(strategy).config).width_field
    except (TTScaleError, ValueError):  # unknown, or not constructible from its name alone: the common field
        return "n"


def _strategy_config(run: RunInfo) -> dict[str, Any]:
    """The strategy's own config: under `config` in the runner's run config, else the run config itself."""
    inner = run.config.get("config")
    return inner if isinstance(inner, dict) else run.config


def run_sweep_meta(run: RunInfo) -> dict[str, Any]:
    """The sweep the runner stored with the run (`--n 1,2,4,8`: `{"key", "field", "value"}`), or {}."""
    sweep = (getattr(run, "meta", None) or {}).get("sweep")
    return sweep if isinstance(sweep, dict) else {}


def run_width(run: RunInfo) -> int | None:
    """The run's width: the stored sweep value, else its strategy's width field (a schedule's first
    round for PDR); None when it has none."""
    stored = run_sweep_meta(run).get("value")
    if isinstance(stored, int) and not isinstance(stored, bool):
        return stored
    field = width_field(run.strategy)
    value = _strategy_config(run).get(field) if field else None
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def sweep_key(run: RunInfo) -> str:
    """Runs with the same key are one width sweep: the key stored with the run (`--n 1,2,4,8`) when there
    is one, else the dataset, strategy, backend and every setting but the width (so runs of older
    versions that differ only in `n` are one sweep too). A run without a width is a sweep of its own."""
    stored = run_sweep_meta(run).get("key")
    if stored:
        return f"{run.dataset}|{stored}"
    field = width_field(run.strategy)
    if field is None or run_width(run) is None:
        return f"run|{run.run_id}"
    cfg = dict(run.config)
    if isinstance(cfg.get("config"), dict):
        cfg["config"] = {k: v for k, v in cfg["config"].items() if k != field}
    else:
        cfg.pop(field, None)
    return f"{run.dataset}|{run.strategy}|{run.backend}|{config_hash(cfg)}"


def sweep_label(run: RunInfo) -> str:
    """A sweep's name: the stored sweep key (its spec with the width as `*`), else the run's spec without
    the width; and the dataset."""
    stored = run_sweep_meta(run).get("key")
    if stored:
        return f"{stored} ({run.dataset})"
    field = width_field(run.strategy) or "n"
    spec = re.sub(rf"(?<=[:,]){re.escape(field)}=(\[[^\]]*\]|[^,]+),?", "", run.spec).rstrip(",:")
    return f"{spec} ({run.dataset})"


@dataclass
class Sweep:
    """Runs of one width sweep, ordered by width (a single run is a sweep of one)."""

    key: str
    label: str
    runs: list[RunSummary]

    @property
    def widths(self) -> list[int | None]:
        return [run_width(s.run) for s in self.runs]


def sweeps(summaries: Sequence[RunSummary]) -> list[Sweep]:
    """Group summaries into width sweeps (see `sweep_key`), in order of first appearance."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(sweep_key(s.run), []).append(s)
    out = []
    for key, members in groups.items():
        members.sort(key=lambda s: (run_width(s.run) or 0, s.run.run_id))
        out.append(Sweep(key, sweep_label(members[0].run), members))
    return out


SELF_CONSISTENCY = ("self-consistency", "sc", "majority", "maj")


def _costs(rows: Sequence[Row]) -> dict[str, tuple[int, int, bool | None]]:
    return {r.problem_id: (r.generated_tokens, r.sequential_tokens, r.correct) for r in rows}


def compare(store: ResultStore, runs: Sequence[RunInfo], baseline: str | None = None,
            problems: Collection[str] | None = None) -> list[RunSummary]:
    """Summaries of runs, with savings against the baseline run measured on the problems both answered.

    The baseline is given by spec or run id; by default the first self-consistency run, else the first.
    `problems`: only these problem ids (what one invocation ran: a run also holds the problems an earlier,
    larger `--limit` stored), its total then theirs.
    """
    out = []
    costs: dict[str, dict[str, tuple[int, int, bool | None]]] = {}  # run id -> its answered problems' costs
    for r in runs:
        rows = store.rows(r.run_id, errors=False, problems=problems)  # read (and parsed) once per run
        costs[r.run_id] = _costs(rows)
        maj, pas = run_k_metrics(rows)
        shown = r if problems is None else replace(r, total=len(problems))
        out.append(RunSummary(shown, run_summary(r, rows), errors=store.count(r.run_id, "error", problems),
                              maj_at_k=maj, pass_at_k=pas, wall_source=wall_times(r, rows)[1]))
    if not out:
        return out
    base = next((s for s in out if s.run.strategy in SELF_CONSISTENCY), out[0])
    if baseline is not None:
        from ttscale.strategies.registry import canonical_spec

        names = {baseline, canonical_spec(baseline) or baseline}
        hits = [s for s in out if names & {s.run.spec, s.run.run_id, s.run.strategy}]
        from ttscale.errors import ConfigError

        if not hits:
            raise ConfigError(f"baseline {baseline!r} is not among the runs: {', '.join(s.run.spec for s in out)}")
        if len(hits) > 1:  # e.g. one spec run on two backends: which one is the baseline is the user's to say
            runs_listed = "; ".join(f"{s.run.run_id} ({s.run.spec} on {s.run.backend}, {s.run.dataset})"
                                    for s in hits)
            raise ConfigError(f"baseline {baseline!r} matches {len(hits)} runs: {runs_listed}; give its run id")
        base = hits[0]
    base_costs = costs[base.run.run_id]
    for s in out:
        if s.run.dataset == base.run.dataset:
            p = paired_savings(costs[s.run.run_id], base_costs)
            s.savings = replace(savings(s.summary, base.summary), tokens_ratio=1.0 - p.tokens_saved_fraction,
                                sequential_ratio=1.0 - p.sequential_saved_fraction,
                                accuracy_delta=p.accuracy_delta)
            if s is not base:
                s.paired, s.baseline = p, base.run.spec
    return out


def headline(summaries: Sequence[RunSummary]) -> list[str]:
    """One line per run: the tokens it saved against the baseline run on the same problems (measured),
    then the aborted-branch estimate the run reported for itself."""
    lines = []
    for s in summaries:
        p = s.paired
        if p is None:
            continue
        lines.append(
            f"{s.run.spec} vs {s.baseline} on {p.problems} shared problems ({s.run.dataset}): "
            f"{p.tokens_saved:,} generated tokens saved ({p.tokens_saved_fraction:.1%}), "
            f"{p.sequential_saved_fraction:.1%} of sequential tokens, accuracy {p.accuracy_delta:+.3f}; "
            f"its own estimate of tokens saved by aborts: {s.summary.saved_tokens:,}")
    return lines


HEADERS = ["run", "strategy", "dataset", "problems", "errors", "accuracy", "95% CI", "mean tokens",
           "mean seq. tokens", "mean wall s", "tokens vs base", "seq. vs base", "maj@k", "pass@k"]


def format_at_k(values: dict[int, float]) -> str:
    """`k=1 0.400, k=4 0.700` (or `-` when not computable)."""
    return ", ".join(f"k={k} {v:.3f}" for k, v in sorted(values.items())) or "-"


def format_wall(s: RunSummary) -> str:
    """Mean wall time per problem: measured, `… (recorded)` for a replay, `n/a` when a replay has none."""
    if s.wall_source == "n/a":
        return "n/a (replay)"
    text = f"{s.summary.mean_wall_s:.2f}"
    return f"{text} (recorded)" if s.wall_source == "recorded" else text


def _accuracy_cells(m: Summary) -> list[str]:
    """Accuracy and its CI, or "-" for a run with nothing graded (all errors, or no references): not 0."""
    if not m.graded:
        return ["-", "-"]
    return [f"{m.accuracy:.3f}", f"[{m.ci_low:.3f}, {m.ci_high:.3f}]"]


def table_rows(summaries: Sequence[RunSummary], wall: bool = True) -> list[list[str]]:
    rows = []
    for s in summaries:
        m = s.summary
        sv = s.savings
        rows.append([
            s.run.run_id, s.run.spec, s.run.dataset, f"{m.problems}/{s.run.total}", str(s.errors),
            *_accuracy_cells(m),
            f"{m.mean_tokens:.1f}" if m.problems else "-", f"{m.mean_sequential_tokens:.1f}" if m.problems else "-",
            format_wall(s) if wall and m.problems else "-",
            f"{sv.tokens_ratio:.2f}x" if sv else "-", f"{sv.sequential_ratio:.2f}x" if sv else "-",
            format_at_k(s.maj_at_k), format_at_k(s.pass_at_k),
        ])
    return rows


def rich_table(summaries: Sequence[RunSummary], title: str = "comparison") -> Table:
    t = Table(title=title, caption="\n".join(headline(summaries)) or None)
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("run", "strategy", "dataset") else "right")
    for row in table_rows(summaries):
        t.add_row(*row)
    return t


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    return _markdown(HEADERS, table_rows(summaries))


def at_k_table(summaries: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """maj@k and pass@k with one column per k: (headers, rows), one row per run and metric."""
    ks = sorted({k for s in summaries for k in (*s.maj_at_k, *s.pass_at_k)})
    rows = []
    for s in summaries:
        for name, values in (("maj@k", s.maj_at_k), ("pass@k", s.pass_at_k)):
            rows.append([s.run.run_id, s.run.spec, s.run.dataset, name]
                        + [f"{values[k]:.3f}" if k in values else "-" for k in ks])
    return ["run", "strategy", "dataset", "metric", *(f"k={k}" for k in ks)], rows


def sweep_table(groups: Sequence[Sweep]) -> tuple[list[str], list[list[str]]]:
    """One row per run of each sweep of two or more widths, ordered by width."""
    rows = []
    for g in groups:
        if len(g.runs) < 2:
            continue
        for s, w in zip(g.runs, g.widths, strict=True):
            m = s.summary
            rows.append([g.label, str(w), s.run.run_id, *_accuracy_cells(m),
                         f"{m.mean_tokens:.1f}" if m.problems else "-",
                         f"{m.mean_sequential_tokens:.1f}" if m.problems else "-",
                         format_wall(s) if m.problems else "-"])
    return ["sweep", "width", "run", "accuracy", "95% CI", "mean tokens", "mean seq. tokens", "mean wall s"], rows


# ------------------------------------------------------------------------------------------------ plots


def draw_accuracy(ax: Any, summaries: Sequence[RunSummary], x_attr: str, front: bool = False) -> None:
    """Accuracy against a cost on `ax`: a line with a marker per width for each sweep, a point for a single run.
    Runs with nothing graded (all errors) have no point: drawn at accuracy 0 and no cost they sat on the front."""
    pts = []
    for g in sweeps([s for s in summaries if s.summary.graded]):
        xs = [getattr(s.summary, x_attr) for s in g.runs]
        ys = [s.summary.accuracy for s in g.runs]
        pts += list(zip(xs, ys, strict=True))
        yerr = [[max(0.0, s.summary.accuracy - s.summary.ci_low) for s in g.runs],
                [max(0.0, s.summary.ci_high - s.summary.accuracy) for s in g.runs]]
        if len(g.runs) > 1:
            bars = ax.errorbar(xs, ys, yerr=yerr, fmt="-o", capsize=3, label=f"{g.label}, width sweep")
            for x, y, w in zip(xs, ys, g.widths, strict=True):
                ax.annotate(f"n={w}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7,
                            color=bars.lines[0].get_color())
        else:
            run = g.runs[0].run
            twins = sum(1 for o in summaries if (o.run.spec, o.run.dataset) == (run.spec, run.dataset))
            backend = f", {run.backend}" if twins > 1 else ""  # the same spec on two backends or models
            ax.errorbar(xs, ys, yerr=yerr, fmt="o", capsize=4, label=f"{run.spec} ({run.dataset}{backend})")
    if front and pts:
        idx = pareto_front(pts)
        ax.plot([pts[i][0] for i in idx], [pts[i][1] for i in idx], "k--", lw=1.2, label="Pareto front")


def _plot(summaries: Sequence[RunSummary], x_attr: str, xlabel: str, path: Path, front: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    draw_accuracy(ax, summaries, x_attr, front)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    plots: list[Path]


def write_report(store: ResultStore, runs: Sequence[RunInfo], out_dir: str | Path, *,
                 baseline: str | None = None, title: str = "ttscale eval report") -> ReportFiles:
    """Write report.md, report.html (plots embedded as data URIs) and the PNG plots into `out_dir`."""
    from ttscale.evals.outputs import output_folder

    out = output_folder(out_dir, "--out")
    summaries = compare(store, runs, baseline)
    figures: list[tuple[str, Path]] = [
        ("Accuracy vs total tokens",
         _plot(summaries, "mean_tokens", "mean generated tokens per problem", out / "accuracy_vs_tokens.png")),
        ("Accuracy vs sequential tokens",
         _plot(summaries, "mean_sequential_tokens", "mean sequential tokens per problem (latency)",
               out / "accuracy_vs_sequential_tokens.png")),
        ("Pareto front (accuracy vs tokens)",
         _plot(summaries, "mean_tokens", "mean generated tokens per problem", out / "pareto_front.png", front=True)),
    ]
    at_k_headers, at_k_rows = at_k_table(summaries)
    sweep_headers, sweep_rows = sweep_table(sweeps(summaries))
    wall_note = ("Wall times of replayed runs are the time on the traces' recorded timeline (marked recorded), "
                 "or n/a when not recorded; a replay's own run time is not a wall time."
                 if any(is_replay(s.run) for s in summaries) else "")
    saved = headline(summaries)
    md = [f"# {title}", "", f"Database: `{store.path}`", ""]
    if saved:
        md += ["## Savings against the baseline (measured on the same problems)", ""]
        md += [f"- {line}" for line in saved] + [""]
    md += [markdown_table(summaries), ""]
    if wall_note:
        md += [wall_note, ""]
    md += ["## maj@k and pass@k", "", _markdown(at_k_headers, at_k_rows) if at_k_rows else "(no graded traces)", ""]
    if sweep_rows:
        md += ["## Width sweeps", "", _markdown(sweep_headers, sweep_rows), ""]
    for cap, p in figures:
        md += [f"## {cap}", "", f"![{cap}]({p.name})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    figs = "".join(
        f'<figure><img id="{p.stem}" alt="{html.escape(cap)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for cap, p in figures)
    savings_html = ("<h2>Savings against the baseline (measured on the same problems)</h2><ul>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in saved) + "</ul>") if saved else ""
    at_k_html = (_html_table(at_k_headers, at_k_rows, "at-k") if at_k_rows else "<p>(no graded traces)</p>")
    sweep_html = (f"<h2>Width sweeps</h2>{_html_table(sweep_headers, sweep_rows, 'sweeps')}" if sweep_rows else "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f3f3f3}}
figure{{display:inline-block;margin:1em}}img{{max-width:640px}}</style></head>
<body><h1>{html.escape(title)}</h1><p>Database: <code>{html.escape(str(store.path))}</code></p>
{savings_html}{_html_table(HEADERS, table_rows(summaries), "runs")}
{f"<p>{html.escape(wall_note)}</p>" if wall_note else ""}
<h2>maj@k and pass@k</h2>{at_k_html}
{sweep_html}
{figs}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return ReportFiles(md_path, html_path, [p for _, p in figures])
