"""`ttscale eval --output-path DIR`: a results JSON and a per-sample JSONL, defined here as pydantic models.

The writer builds these models and the tests validate the files with them, so the schema documented in
docs/outputs.md cannot drift from what is written. Field names follow lm-eval's `--output_path` /
`--log_samples` files where one exists (`results`, `configs`, `versions`, `n-samples`; `doc_id`, `doc`,
`target`, `resps`, `filtered_resps`, `acc`); the rest are ttscale's own.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ttscale.evals.datasets import Dataset
from ttscale.evals.report import RunSummary, compare, row_wall_time
from ttscale.evals.store import ResultStore, RunInfo
from ttscale.types import Usage

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RunMetrics(_Strict):
    """One run's metrics over its answered problems (errored problems are counted apart)."""

    accuracy: float | None = Field(description="share of graded answers that are right; None: none graded")
    accuracy_ci_low: float | None = Field(description="95% bootstrap CI, lower end; None: none graded")
    accuracy_ci_high: float | None = Field(description="95% bootstrap CI, upper end; None: none graded")
    n_problems: int = Field(description="problems in the run (the dataset slice)")
    n_answered: int = Field(description="problems with an answer (right or wrong)")
    n_graded: int = Field(description="answered problems with a reference to grade against")
    n_errors: int = Field(description="problems that failed (no answer)")
    mean_total_tokens: float | None = Field(description="generated tokens per answered problem; None: none answered")
    mean_sequential_tokens: float | None = Field(description="critical-path tokens per answered problem; None: "
                                                             "none answered")
    mean_wall_time_s: float | None = Field(description="wall time per answered problem; None: none answered")
    total_wall_time_s: float = Field(description="sum of per-problem wall times")
    maj_at_k: dict[str, float] = Field(description="k -> maj@k, the mean vote over k-subsets of the graded "
                                       "traces (maj@1 = pass@1); {} if not computable")
    pass_at_k: dict[str, float] = Field(description="k -> unbiased pass@k; {} if not computable")


class RunConfig(_Strict):
    """What produced a run."""

    run_id: str
    dataset: str
    strategy: str
    spec: str = Field(description="the strategy spec as given on the command line")
    config: dict[str, Any] = Field(description="strategy config, backend, budget, limits, seed (hashed)")
    model: str = Field(description="the backend spec (model)")
    status: str = Field(description="done | error | interrupted | running")
    sweep: dict[str, Any] | None = Field(
        None, description="the width sweep the run is a point of: key (spec with the width as *), field, value")


class ResultsFile(_Strict):
    """results.json: metrics and config of every run of one `ttscale eval` command, keyed by run id."""

    schema_version: int = SCHEMA_VERSION
    results: dict[str, RunMetrics]
    configs: dict[str, RunConfig]
    versions: dict[str, str] = Field(description="ttscale version and this schema's version")
    n_samples: dict[str, int] = Field(alias="n-samples", description="run id -> lines in samples.jsonl")
    samples_file: str = SAMPLES_FILE
    database: str = Field(description="the SQLite results database the files were read from")
    date: str = Field(description="UTC time of writing, ISO 8601")


class TraceRecord(_Strict):
    """One trace (branch) of a sample."""

    id: str
    text: str
    answer: str | None = Field(description="answer extracted from this trace")
    correct: bool | None = Field(description="this trace's answer graded; None: not graded")
    status: str
    finish_reason: str | None
    num_tokens: int


class SampleRecord(_Strict):
    """One line of samples.jsonl: one problem of one run."""

    run_id: str
    dataset: str
    strategy: str = Field(description="strategy spec")
    doc_id: int = Field(description="the problem's index in the dataset")
    problem_id: str
    doc: dict[str, Any] = Field(description="the problem as loaded: id, prompt or messages, answer, kind")
    prompt: str | None
    target: str | None = Field(description="reference answer")
    resps: list[str] = Field(description="trace texts")
    filtered_resps: list[str | None] = Field(description="answer extracted from each trace")
    answer: str | None = Field(description="the strategy's final answer")
    acc: int | None = Field(description="1 right, 0 wrong, None ungraded or errored")
    correct: bool | None
    error: str | None = Field(description="why the problem failed; None when answered")
    fallbacks: list[str] = Field(default_factory=list, description="the Result's notes on where the run "
                                 "deviated or fell short (a budget that ran out before any answer, ...)")
    traces: list[TraceRecord]
    usage: Usage
    wall_time_s: float


def run_metrics(s: RunSummary) -> RunMetrics:
    m = s.summary
    return RunMetrics(
        accuracy=m.accuracy if m.graded else None, accuracy_ci_low=m.ci_low if m.graded else None,
        accuracy_ci_high=m.ci_high if m.graded else None,
        n_problems=s.run.total, n_answered=m.problems, n_graded=m.graded, n_errors=s.errors,
        mean_total_tokens=m.mean_tokens if m.problems else None,
        mean_sequential_tokens=m.mean_sequential_tokens if m.problems else None,
        mean_wall_time_s=m.mean_wall_s if m.problems else None, total_wall_time_s=m.total_wall_s,
        maj_at_k={str(k): v for k, v in s.maj_at_k.items()},
        pass_at_k={str(k): v for k, v in s.pass_at_k.items()})


def sample_records(store: ResultStore, run: RunInfo, dataset: Dataset,
                   only: Collection[str] | None = None) -> list[SampleRecord]:
    """The stored rows of a run (of the problem ids `only`, when given) joined with the dataset's problems."""
    problems = {p.id: p for p in dataset.problems}
    out = []
    for r in store.rows(run.run_id, problems=only):
        p = problems.get(r.problem_id)
        traces = [TraceRecord(id=t.id, text=t.text, answer=t.answer, correct=t.meta.get("correct"),
                              status=t.status.value,
                              finish_reason=t.finish_reason, num_tokens=t.num_tokens)
                  for t in r.result.traces]
        out.append(SampleRecord(
            run_id=run.run_id, dataset=run.dataset, strategy=run.spec, doc_id=r.idx, problem_id=r.problem_id,
            doc=p.model_dump(mode="json") if p is not None else {"id": r.problem_id},
            prompt=p.prompt if p is not None else None, target=r.reference,
            resps=[t.text for t in traces], filtered_resps=[t.answer for t in traces], answer=r.answer,
            acc=None if r.correct is None else int(r.correct), correct=r.correct, error=r.error,
            fallbacks=list(r.result.fallbacks), traces=traces, usage=r.result.usage, wall_time_s=row_wall_time(run, r)))
    return out


def _version() -> str:
    try:
        return metadata.version("ttscale")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_outputs(store: ResultStore, runs: Sequence[RunInfo], datasets: Mapping[str, Dataset],
                  baseline: str | None = None, problems: Collection[str] | None = None
                  ) -> tuple[ResultsFile, dict[str, list[SampleRecord]]]:
    """The results file and each run's sample records; `datasets` maps a run's dataset key to its problems;
    `problems`: only these problem ids (`compare`)."""
    summaries = compare(store, runs, baseline, problems)
    samples = {r.run_id: sample_records(store, r, datasets.get(r.dataset) or Dataset(r.dataset, [], "unknown"),
                                        problems)
               for r in runs}
    results = ResultsFile(
        results={s.run.run_id: run_metrics(s) for s in summaries},
        configs={r.run_id: RunConfig(run_id=r.run_id, dataset=r.dataset, strategy=r.strategy, spec=r.spec,
                                     config=r.config, model=r.backend, status=store.run(r.run_id).status,
                                     sweep=store.run(r.run_id).meta.get("sweep"))
                 for r in runs},
        versions={"ttscale": _version(), "schema": str(SCHEMA_VERSION)},
        n_samples={k: len(v) for k, v in samples.items()}, database=str(store.path),
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    return results, samples


def output_folder(path: str | Path, flag: str) -> Path:
    """The folder `flag` names, made when missing; a ConfigError naming the flag when it cannot be (a file is
    there, a parent is a file, no permission): checked before an eval runs, not after its compute."""
    from ttscale.errors import ConfigError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a file; give a folder (made when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {str(out)!r} cannot be made: {exc.strerror or exc}") from exc
    return out


def output_file(path: str | Path, flag: str) -> Path:
    """The file `flag` names, its folder made when missing; a ConfigError naming the flag when it is a folder
    or its folder cannot be made."""
    from ttscale.errors import ConfigError

    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a folder; give a file path")
    output_folder(out.parent, flag)
    return out


def write_output_files(results: ResultsFile, samples: Mapping[str, list[SampleRecord]],
                       out_dir: str | Path) -> tuple[Path, Path]:
    """results.json and samples.jsonl into `out_dir` (made when missing, earlier files replaced)."""
    out = output_folder(out_dir, "the output folder")
    results_path, samples_path = out / RESULTS_FILE, out / SAMPLES_FILE
    results_path.write_text(json.dumps(results.model_dump(mode="json", by_alias=True), indent=2) + "\n",
                            encoding="utf-8")
    with samples_path.open("w", encoding="utf-8") as f:
        for recs in samples.values():
            for rec in recs:
                f.write(rec.model_dump_json() + "\n")
    return results_path, samples_path


def write_outputs(store: ResultStore, runs: Sequence[RunInfo], dataset: Dataset | Mapping[str, Dataset],
                  out_dir: str | Path, baseline: str | None = None,
                  problems: Collection[str] | None = None) -> tuple[Path, Path]:
    """Write results.json and samples.jsonl for `runs` into `out_dir` (replacing earlier ones); `problems`:
    only these problem ids (`compare`)."""
    datasets = {dataset.key: dataset} if isinstance(dataset, Dataset) else dataset
    results, samples = build_outputs(store, runs, datasets, baseline, problems)
    return write_output_files(results, samples, out_dir)
