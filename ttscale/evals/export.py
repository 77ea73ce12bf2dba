"""`ttscale export RUN... --format jsonl|json --output PATH`: a stored run as the files of `--output-path`.

    ttscale export 3f2a9c --db results.db --output out/                 # out/results.json + out/samples.jsonl
    ttscale export 3f2a9c 81bd04 --format json --output runs.json        # one JSON document

The schema is the one of `ttscale eval --output-path` (docs/outputs.md, `ttscale.evals.outputs`). A
sample's `doc` and `prompt` come from the dataset, which the database does not hold: it is loaded again
from the run's dataset key when that works offline (bundled and generated sets, local files by name) or
from a `--dataset` holding the run's problems (the file moved or was renamed); otherwise those two fields
are left minimal (`doc` = the id, `prompt` null) and the export says so.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from ttscale.errors import ConfigError, TTScaleError
from ttscale.evals.datasets import Dataset, load_dataset
from ttscale.evals.outputs import (
    RESULTS_FILE,
    SAMPLES_FILE,
    ResultsFile,
    SampleRecord,
    build_outputs,
    output_file,
    output_folder,
    write_output_files,
)
from ttscale.evals.store import ResultStore, RunInfo

ExportFormat = Literal["jsonl", "json"]


class ExportFile(ResultsFile):
    """`--format json`: results.json's fields plus every sample record under `samples`."""

    samples: list[SampleRecord] = Field(description="the lines of samples.jsonl, in run then dataset order")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Reloading a dataset for an export must never download it."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def reload_dataset(run: RunInfo, data_dir: str | None = None) -> Dataset | None:
    """The dataset a run was evaluated on, loaded again from its key, else from the file it was read from
    (a file's key is its name and content hash; None when neither gives the same dataset back)."""
    seed = int(run.config.get("seed", 0) or 0)
    for name in (run.dataset.split("@", 1)[0], run.meta.get("dataset_file")):
        if not name:
            continue
        try:
            with _offline():
                ds = load_dataset(name, data_dir=data_dir, limit=run.total, seed=seed)
        except (TTScaleError, OSError, ImportError):
            continue
        if ds.key == run.dataset:
            return ds
    return None


def _holding(datasets: Sequence[Dataset], ids: set[str]) -> Dataset | None:
    """The first given dataset holding every one of `ids` (a renamed or moved file of the run's problems)."""
    return next((d for d in datasets if ids <= {p.id for p in d.problems}), None)


def export_runs(store: ResultStore, runs: Sequence[RunInfo], output: str | Path, fmt: ExportFormat = "jsonl", *,
                datasets: Sequence[Dataset] = (), data_dir: str | None = None,
                baseline: str | None = None) -> tuple[list[Path], list[str]]:
    """Write `runs` to `output` (jsonl: a folder with results.json and samples.jsonl; json: one file).

    Returns the files written and the dataset keys that could not be loaded (their samples' `doc` is minimal).
    """
    if fmt not in ("jsonl", "json"):
        raise ConfigError(f"--format must be jsonl or json (got {fmt!r})")
    if not runs:
        raise ConfigError("nothing to export: no runs given")
    try:  # a bad --output is named before the runs are read
        out = output_file(output, "--output") if fmt == "json" else output_folder(output, "--output")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; --format jsonl writes a folder ({RESULTS_FILE} and {SAMPLES_FILE}), --format "
                          "json one file") from exc
    known = {d.key: d for d in datasets}
    missing: list[str] = []
    for run in runs:
        if run.dataset in known or run.dataset in missing:
            continue
        ds = reload_dataset(run, data_dir) or _holding(datasets, {r.problem_id for r in store.rows(run.run_id)})
        if ds is None:
            missing.append(run.dataset)
        else:
            known[run.dataset] = ds
    results, samples = build_outputs(store, runs, known, baseline)
    if fmt == "json":
        doc = ExportFile(**results.model_dump(by_alias=True), samples=[s for recs in samples.values() for s in recs])
        out.write_text(json.dumps(doc.model_dump(mode="json", by_alias=True), indent=2) + "\n", encoding="utf-8")
        return [out], missing
    return list(write_output_files(results, samples, out)), missing
