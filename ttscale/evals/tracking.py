"""Experiment tracking for `ttscale eval --track SPEC`: TensorBoard (tensorboardX) or MLflow.

    ttscale eval --dataset smoke --strategy self-consistency:n=4 --track tensorboard:runs/
    tensorboard --logdir runs/

A tracker sees each run start (its spec and config as text), every stored problem (running accuracy, that
problem's tokens and wall time, step = problems done), and the run's final metrics (`log_summary`, the
numbers of results.json). The SQLite store stays the record; a tracker is a view for dashboards.
Each run is its own TensorBoard run folder `DIR/<run id>` (or MLflow run named by its spec).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ttscale.errors import ConfigError, UnknownNameError
from ttscale.evals.store import RunInfo

TRACKERS = ("tensorboard", "mlflow")


class Tracker(Protocol):
    """Where eval metrics are mirrored while runs go; every method is called from the event loop."""

    def start_run(self, run: RunInfo) -> None: ...

    def log_problem(self, run: RunInfo, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_summary(self, run: RunInfo, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


class TensorBoardTracker:
    """Scalars `problem/<metric>` per stored problem and `summary/<metric>` once per run, one folder per run."""

    def __init__(self, logdir: str | Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as exc:
            raise ConfigError("--track tensorboard needs tensorboardX: pip install 'ttscale[eval]'") from exc
        self.logdir = Path(logdir)
        self._writer_cls = SummaryWriter
        self._writers: dict[str, Any] = {}

    def _writer(self, run: RunInfo) -> Any:
        if run.run_id not in self._writers:
            self._writers[run.run_id] = self._writer_cls(str(self.logdir / run.run_id))
        return self._writers[run.run_id]

    def start_run(self, run: RunInfo) -> None:
        w = self._writer(run)
        w.add_text("run/spec", run.spec, 0)
        w.add_text("run/config", f"```json\n{json.dumps(run.config, indent=1, sort_keys=True)}\n```", 0)

    def log_problem(self, run: RunInfo, step: int, metrics: Mapping[str, float]) -> None:
        w = self._writer(run)
        for k, v in _finite(metrics).items():
            w.add_scalar(f"problem/{k}", v, step)
        w.flush()

    def log_summary(self, run: RunInfo, metrics: Mapping[str, float]) -> None:
        w = self._writer(run)
        for k, v in _finite(metrics).items():
            w.add_scalar(f"summary/{k}", v, 0)
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


class MLflowTracker:
    """One MLflow run per eval run (named by its spec, tagged with its run id); needs `mlflow` installed."""

    def __init__(self, tracking_uri: str | None):
        try:
            import mlflow
        except ImportError as exc:
            raise ConfigError("--track mlflow needs mlflow: pip install mlflow") from exc
        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self._runs: dict[str, str] = {}

    def _ensure(self, run: RunInfo) -> str:
        if run.run_id not in self._runs:
            client = self._mlflow.MlflowClient()
            exp = self._mlflow.set_experiment(f"ttscale/{run.dataset}")
            created = client.create_run(exp.experiment_id, run_name=run.spec, tags={"ttscale.run_id": run.run_id})
            self._runs[run.run_id] = created.info.run_id
        return self._runs[run.run_id]

    def start_run(self, run: RunInfo) -> None:
        client = self._mlflow.MlflowClient()
        rid = self._ensure(run)
        client.log_param(rid, "spec", run.spec)
        client.log_param(rid, "backend", run.backend)

    def log_problem(self, run: RunInfo, step: int, metrics: Mapping[str, float]) -> None:
        client = self._mlflow.MlflowClient()
        for k, v in _finite(metrics).items():
            client.log_metric(self._ensure(run), f"problem/{k}", v, step=step)

    def log_summary(self, run: RunInfo, metrics: Mapping[str, float]) -> None:
        client = self._mlflow.MlflowClient()
        for k, v in _finite(metrics).items():
            client.log_metric(self._ensure(run), f"summary/{k}", v)

    def close(self) -> None:
        client = self._mlflow.MlflowClient()
        for rid in self._runs.values():
            client.set_terminated(rid)
        self._runs.clear()


def make_tracker(spec: str) -> Tracker:
    """`tensorboard:DIR` or `mlflow[:TRACKING_URI]`."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "tensorboard":
        if not arg:
            raise ConfigError("--track tensorboard needs a folder: --track tensorboard:DIR")
        return TensorBoardTracker(arg)
    if kind == "mlflow":
        return MLflowTracker(arg or None)
    raise UnknownNameError("tracker", kind, list(TRACKERS))
