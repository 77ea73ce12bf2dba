"""The proxy's own Prometheus metrics (`GET /metrics`, prometheus-client's text format).

- `ttscale_requests_total{route, model, strategy, status}`: answered requests (`strategy` is `passthrough`
  for relayed ones; status 499: the client went away first). `model` is a served model name or `other`:
  labels never take names a client made up.
- `ttscale_requests_in_flight{route}`, `ttscale_request_duration_seconds{route, strategy}` (until the last
  byte of the answer went out).
- `ttscale_strategy_runs_total{strategy, outcome}` (ok | error | cancelled),
  `ttscale_strategy_run_duration_seconds{strategy}`, `ttscale_strategy_branches_total{strategy, status}`.
- `ttscale_tokens_total{direction, strategy}`: prompt and completion tokens; a strategy's are all its
  branches', a pass-through request's what the upstream reported in `usage` (a stream: only with
  `stream_options.include_usage`).

Each `Serving` has its own registry (apps in one process do not share counts). With `ttscale serve
--workers N` each worker counts its own requests unless `PROMETHEUS_MULTIPROC_DIR` is set, which the CLI
does: then every worker answers with the sum over all of them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - the /metrics media type
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from ttscale.types import Result

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class RequestObserver:
    """One request's part in the metrics (`relay.Observer`): in flight from `started` to `finished`."""

    def __init__(self, metrics: ProxyMetrics, route: str, model: str, strategy: str) -> None:
        self.metrics, self.route, self.model, self.strategy = metrics, route, model, strategy
        self.t0: float | None = None

    def started(self) -> None:
        self.t0 = time.monotonic()
        self.metrics.in_flight.labels(self.route).inc()

    def tokens(self, prompt: int, completion: int) -> None:
        self.metrics.add_tokens(self.strategy, prompt, completion)

    def finished(self, status: int) -> None:
        m = self.metrics
        if self.t0 is not None:
            m.in_flight.labels(self.route).dec()
            m.latency.labels(self.route, self.strategy).observe(time.monotonic() - self.t0)
        m.requests.labels(self.route, self.model, self.strategy, str(status)).inc()


class ProxyMetrics:
    """The proxy's counters, gauges and histograms, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ttscale_requests", "Requests answered, by route, model, strategy and status",
                                ["route", "model", "strategy", "status"], registry=r)
        self.in_flight = Gauge("ttscale_requests_in_flight", "Requests being answered", ["route"], registry=r,
                               multiprocess_mode="livesum")
        self.latency = Histogram("ttscale_request_duration_seconds", "Request received to last byte sent",
                                 ["route", "strategy"], buckets=_LATENCY_BUCKETS, registry=r)
        self.runs = Counter("ttscale_strategy_runs", "Strategy runs, by outcome (ok, error, cancelled)",
                            ["strategy", "outcome"], registry=r)
        self.run_latency = Histogram("ttscale_strategy_run_duration_seconds", "Strategy run start to result",
                                     ["strategy"], buckets=_LATENCY_BUCKETS, registry=r)
        self.branches = Counter("ttscale_strategy_branches", "Branches strategies started, by how they ended",
                                ["strategy", "status"], registry=r)
        self.tokens = Counter("ttscale_tokens", "Prompt and completion tokens (strategies: all branches)",
                              ["direction", "strategy"], registry=r)

    def request(self, route: str, model: str, strategy: str) -> RequestObserver:
        return RequestObserver(self, route, model, strategy)

    def refused(self, route: str, model: str, strategy: str, status: int) -> None:
        """A request answered with an error before anything was relayed or run."""
        self.requests.labels(route, model, strategy, str(status)).inc()

    def add_tokens(self, strategy: str, prompt: int, completion: int) -> None:
        if prompt:
            self.tokens.labels("prompt", strategy).inc(prompt)
        if completion:
            self.tokens.labels("completion", strategy).inc(completion)

    def strategy_run(self, strategy: str, outcome: str, seconds: float) -> None:
        self.runs.labels(strategy, outcome).inc()
        self.run_latency.labels(strategy).observe(seconds)

    def strategy_result(self, strategy: str, result: Result) -> None:
        """Count a finished run's branches: aborted by the strategy (or its budget), or run to their end."""
        u = result.usage
        if u.aborted:
            self.branches.labels(strategy, "aborted").inc(u.aborted)
        if u.branches > u.aborted:
            self.branches.labels(strategy, "finished").inc(u.branches - u.aborted)

    def render(self) -> bytes:
        """The text exposition of these metrics (all workers' under multiprocess mode)."""
        if _multiprocess():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
