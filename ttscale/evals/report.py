"""Comparison tables and reports: Markdown + a self-contained HTML page with embedded PNG plots.

Plots (matplotlib, Agg): accuracy vs mean generated tokens per problem (one point per run, 95% CI bars),
accuracy vs mean sequential tokens, and the Pareto front over total tokens. The PNG files are written
beside the reports too. The table has maj@k and pass@k beside accuracy, from the traces the runner graded.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

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
from ttscale.evals.store import ResultStore, Row, RunInfo


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


def run_k_metrics(rows: Sequence[Row]) -> tuple[dict[int, float], dict[int, float]]:
    """(maj@k, pass@k) of a run from the graded traces of its answered problems (`rows`).

    Computable when every answered problem has traces graded by the runner (`trace.meta["correct"]`);
    else both are empty (rows stored before traces were graded, problems without a reference).
    """
    samples = []
    for r in rows:
        grades = [t.meta.get("correct") for t in r.result.traces]
        if not grades or any(g is None for g in grades):
            return {}, {}
        samples.append(([t.answer for t in r.result.traces], [bool(g) for g in grades]))
    return sample_k_metrics(samples)


def run_summary(run: RunInfo, rows: Sequence[Row]) -> Summary:
    """Metrics over the answered problems (`rows`); errored ones are counted apart (`RunSummary.errors`)."""
    return summarize(
        run.spec, [r.correct for r in rows], [r.generated_tokens for r in rows], [r.sequential_tokens for r in rows],
        [r.wall_time_s for r in rows], [r.saved_tokens for r in rows],
    )


SELF_CONSISTENCY = ("self-consistency", "sc", "majority", "maj")


def _costs(rows: Sequence[Row]) -> dict[str, tuple[int, int, bool | None]]:
    return {r.problem_id: (r.generated_tokens, r.sequential_tokens, r.correct) for r in rows}


def compare(store: ResultStore, runs: Sequence[RunInfo], baseline: str | None = None) -> list[RunSummary]:
    """Summaries of runs, with savings against the baseline run measured on the problems both answered.

    The baseline is given by spec or run id; by default the first self-consistency run, else the first.
    """
    out = []
    costs: dict[str, dict[str, tuple[int, int, bool | None]]] = {}  # run id -> its answered problems' costs
    for r in runs:
        rows = store.rows(r.run_id, errors=False)  # read (and parsed) once per run
        costs[r.run_id] = _costs(rows)
        maj, pas = run_k_metrics(rows)
        out.append(RunSummary(r, run_summary(r, rows), errors=store.count(r.run_id, "error"),
                              maj_at_k=maj, pass_at_k=pas))
    if not out:
        return out
    base = next((s for s in out if s.run.strategy in SELF_CONSISTENCY), out[0])
    if baseline is not None:
        hits = [s for s in out if baseline in (s.run.spec, s.run.run_id, s.run.strategy)]
        if not hits:
            from ttscale.errors import ConfigError

            raise ConfigError(f"baseline {baseline!r} is not among the runs: {', '.join(s.run.spec for s in out)}")
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


def table_rows(summaries: Sequence[RunSummary], wall: bool = True) -> list[list[str]]:
    rows = []
    for s in summaries:
        m = s.summary
        sv = s.savings
        rows.append([
            s.run.run_id, s.run.spec, s.run.dataset, f"{m.problems}/{s.run.total}", str(s.errors),
            f"{m.accuracy:.3f}" if m.problems else "-",
            f"[{m.ci_low:.3f}, {m.ci_high:.3f}]", f"{m.mean_tokens:.1f}", f"{m.mean_sequential_tokens:.1f}",
            f"{m.mean_wall_s:.2f}" if wall else "-",
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


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summaries)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _plot(summaries: Sequence[RunSummary], x_attr: str, xlabel: str, path: Path, front: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    pts = []
    for s in summaries:
        m = s.summary
        x = getattr(m, x_attr)
        pts.append((x, m.accuracy))
        yerr = [[max(0.0, m.accuracy - m.ci_low)], [max(0.0, m.ci_high - m.accuracy)]]
        ax.errorbar([x], [m.accuracy], yerr=yerr, fmt="o", capsize=4, label=f"{s.run.spec} ({s.run.dataset})")
    if front and pts:
        idx = pareto_front(pts)
        ax.plot([pts[i][0] for i in idx], [pts[i][1] for i in idx], "k--", lw=1.2, label="Pareto front")
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = compare(store, runs, baseline)
    plots = [
        _plot(summaries, "mean_tokens", "mean generated tokens per problem", out / "accuracy_vs_tokens.png"),
        _plot(summaries, "mean_sequential_tokens", "mean sequential tokens per problem (latency)",
              out / "accuracy_vs_sequential_tokens.png"),
        _plot(summaries, "mean_tokens", "mean generated tokens per problem", out / "pareto_front.png", front=True),
    ]
    captions = ["Accuracy vs total tokens", "Accuracy vs sequential tokens", "Pareto front (accuracy vs tokens)"]
    saved = headline(summaries)
    md = [f"# {title}", "", f"Database: `{store.path}`", ""]
    if saved:
        md += ["## Savings against the baseline (measured on the same problems)", ""]
        md += [f"- {line}" for line in saved] + [""]
    md += [markdown_table(summaries), ""]
    for cap, p in zip(captions, plots):
        md += [f"## {cap}", "", f"![{cap}]({p.name})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(summaries))
    figs = "".join(
        f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for cap, p in zip(captions, plots))
    savings_html = ("<h2>Savings against the baseline (measured on the same problems)</h2><ul>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in saved) + "</ul>") if saved else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f3f3f3}}
figure{{display:inline-block;margin:1em}}img{{max-width:640px}}</style></head>
<body><h1>{html.escape(title)}</h1><p>Database: <code>{html.escape(str(store.path))}</code></p>
{savings_html}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{figs}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return ReportFiles(md_path, html_path, plots)
