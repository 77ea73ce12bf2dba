"""`ttscale judge train|eval`: the DeepPrune pair judge on labelled pair files.

Pair file schema (JSONL): `{"a": "<prefix 1>", "b": "<prefix 2>", "same": true|false}`, see
ttscale/judges/pairwise.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from ttscale.errors import TTScaleError

judge_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Train and evaluate trace-pair judges (DeepPrune).")
console = Console()
err = Console(stderr=True)


@judge_app.command("train")
def train(
    pairs: Path = typer.Option(..., "--pairs", help="labelled pair file (JSONL: a, b, same)"),
    out: Path = typer.Option(..., "--out", help="where to write the classifier (JSON)"),
    alpha: float = typer.Option(0.25, "--alpha", help="focal-loss alpha (weight of class 'same')"),
    gamma: float = typer.Option(2.0, "--gamma", help="focal-loss gamma"),
    oversample: int = typer.Option(2, "--oversample", help="repeat the 'different' pairs this many times"),
) -> None:
    """Fit the feature classifier with focal loss and oversampling; print its training AUROC."""
    from ttscale.judges.pairwise import ClassifierJudge, evaluate, load_pairs, pair_features, train_classifier

    try:
        ps, y = load_pairs(pairs)
        X = np.stack([pair_features(a, b) for a, b in ps])
        model = train_classifier(X, y, alpha=alpha, gamma=gamma, oversample=oversample)
        model.save(out)
        m = evaluate(y, ClassifierJudge(model).p_same_many(ps))
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    console.print(f"trained on {m['pairs']} pairs ({m['positives']} same); wrote {out}")
    console.print(f"train AUROC {m['auroc']:.4f}  TNR@0.2FNR {m['tnr_at_0.2_fnr']:.4f}")


@judge_app.command("eval")
def evaluate_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="labelled pair file (JSONL: a, b, same)"),
    judge: str = typer.Option("lexical", "--judge", help="lexical | embedding | classifier:MODEL | llm"),
    backend: str | None = typer.Option(None, "--backend", help="backend spec the llm judge asks (e.g. vllm:PATH)"),
) -> None:
    """Print AUROC and TNR at 0.2 FNR of a judge on labelled pairs (positive = same answer)."""
    from ttscale.judges.pairwise import evaluate, load_pairs, make_judge

    try:
        ps, y = load_pairs(pairs)
        if judge == "llm":
            scores = asyncio.run(_llm_scores(ps, backend))
        else:
            scores = make_judge(judge).p_same_many(ps)
        m = evaluate(y, scores)
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    console.print(f"judge {judge} on {m['pairs']} pairs ({m['positives']} same)")
    console.print(f"AUROC {m['auroc']:.4f}")
    console.print(f"TNR@0.2FNR {m['tnr_at_0.2_fnr']:.4f}")


async def _llm_scores(pairs: list[tuple[str, str]], spec: str | None) -> np.ndarray:
    from ttscale.backends import make_backend
    from ttscale.errors import ConfigError
    from ttscale.judges.pairwise import LLMJudge

    if not spec:
        raise ConfigError("judge 'llm' needs --backend SPEC (the model to ask)")
    be = make_backend(spec)
    try:
        for hook in ("start", "connect"):
            fn = getattr(be, hook, None)
            if fn is not None:
                await fn()
                break
        j = LLMJudge(be)
        return np.array([await j.ap_same(a, b) for a, b in pairs])
    finally:
        await be.close()


def register(app: typer.Typer) -> None:
    """Add the `judge` sub-app to the `ttscale` command."""
    app.add_typer(judge_app, name="judge")
