"""`ttscale judge pairs|train|eval`: the DeepPrune pair judge on labelled pair files.

    ttscale judge pairs --bank BANK --out-dir D --prefix-tokens 48   # D/train.jsonl, D/heldout.jsonl
    ttscale judge train --pairs D/train.jsonl --heldout D/heldout.jsonl --split D/split.json --out M.json
    ttscale judge eval --pairs D/heldout.jsonl --judge classifier:M.json

Pair file schema (JSONL): `{"a": "<prefix 1>", "b": "<prefix 2>", "same": true|false}`, see
ttscale/judges/pairwise.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from ttscale.errors import ConfigError, TTScaleError

judge_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Train and evaluate trace-pair judges (DeepPrune).")
console = Console()
err = Console(stderr=True)


@judge_app.command("pairs")
def pairs_cmd(
    bank: Path = typer.Option(..., "--bank", help="trace bank with complete traces (ttscale bank record)"),
    out_dir: Path = typer.Option(..., "--out-dir", help="folder for train.jsonl, heldout.jsonl, split.json"),
    heldout_frac: float = typer.Option(0.5, "--heldout-frac", help="share of problems held out"),
    split_seed: int = typer.Option(0, "--split-seed", help="seed of the problem split"),
    prefix_words: int = typer.Option(25, "--prefix-words", help="prefix = up to the k-th reasoning word"),
    prefix_tokens: int | None = typer.Option(None, "--prefix-tokens", help="prefix = first T tokens instead"),
) -> None:
    """Labelled prefix pairs from a bank, split by problem (no problem on both sides)."""
    from ttscale.evals.bank import TraceBank
    from ttscale.judges.pairwise import bank_pairs, split_problems

    try:
        tb = TraceBank(bank)
        train_ids, held_ids = split_problems(tb.problem_ids(), heldout_frac, split_seed)
        sides = {side: bank_pairs(tb, ids, prefix_words=prefix_words, prefix_tokens=prefix_tokens)
                 for side, ids in (("train", train_ids), ("heldout", held_ids))}
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    for side, rows in sides.items():
        (out_dir / f"{side}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        console.print(f"{side}: {len(rows)} pairs ({sum(r['same'] for r in rows)} same) from "
                      f"{len({r['problem'] for r in rows})} problems -> {out_dir / (side + '.jsonl')}")
    prefix = {"tokens": prefix_tokens} if prefix_tokens is not None else {"words": prefix_words}
    split = {"bank": str(bank), "bank_id": tb.meta.get("bank_id"), "seed": split_seed, "prefix": prefix,
             "train": train_ids, "heldout": held_ids}
    (out_dir / "split.json").write_text(json.dumps(split, indent=1) + "\n")


@judge_app.command("train")
def train(
    pairs: Path = typer.Option(..., "--pairs", help="labelled pair file (JSONL: a, b, same)"),
    out: Path = typer.Option(..., "--out", help="where to write the classifier (JSON)"),
    heldout: Path | None = typer.Option(None, "--heldout", help="pairs of other problems: report AUROC/TNR "
                                        "on them and store the report in the model"),
    split: Path | None = typer.Option(None, "--split", help="split.json of `ttscale judge pairs`: its prefix "
                                      "and problem ids go into the model's report"),
    tau: float | None = typer.Option(None, "--tau", help="DeepPrune's tau to store and report at (default: "
                                     "calibrated on the training pairs for --target-fpr)"),
    target_fpr: float = typer.Option(0.1, "--target-fpr", help="share of training 'different' pairs the "
                                     "calibrated tau may join"),
    alpha: float = typer.Option(0.25, "--alpha", help="focal-loss alpha (weight of class 'same')"),
    gamma: float = typer.Option(2.0, "--gamma", help="focal-loss gamma"),
    oversample: int = typer.Option(2, "--oversample", help="repeat the 'different' pairs this many times"),
) -> None:
    """Fit the feature classifier with focal loss and oversampling; print its training (and held-out) AUROC."""
    from ttscale.judges.pairwise import (
        ClassifierJudge,
        evaluate,
        load_pairs,
        pair_features,
        rates_at,
        tau_for_fpr,
        train_classifier,
    )

    try:
        ps, y = load_pairs(pairs)
        X = np.stack([pair_features(a, b) for a, b in ps])
        model = train_classifier(X, y, alpha=alpha, gamma=gamma, oversample=oversample)
        scores = ClassifierJudge(model).p_same_many(ps)
        m = evaluate(y, scores)
        tau_rule = "given" if tau is not None else f"train FPR <= {target_fpr}"
        if tau is None:
            tau = tau_for_fpr(y, scores, target_fpr)
        report: dict = {"tau": tau, "tau_rule": tau_rule, "train": {**m, **rates_at(y, scores, tau)}}
        if heldout is not None:
            hp, hy = load_pairs(heldout)
            hs = ClassifierJudge(model).p_same_many(hp)
            report["heldout"] = {**evaluate(hy, hs), **rates_at(hy, hs, tau)}
        if split is not None:
            try:
                sp = json.loads(split.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--split {split}: not a split.json of `ttscale judge pairs` ({e})") from e
            report.update(prefix=sp.get("prefix"), split={k: sp.get(k) for k in ("bank", "bank_id", "seed",
                                                                                  "train", "heldout")})
        model.report = report
        model.save(out)
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"trained on {m['pairs']} pairs ({m['positives']} same); wrote {out}")
    console.print(f"train AUROC {m['auroc']:.4f}  TNR@0.2FNR {m['tnr_at_0.2_fnr']:.4f}  tau {tau:.4f} "
                  f"({report['tau_rule']})")
    if "heldout" in report:
        h = report["heldout"]
        console.print(f"held-out AUROC {h['auroc']:.4f}  TNR@0.2FNR {h['tnr_at_0.2_fnr']:.4f}  "
                      f"({h['pairs']} pairs, {h['positives']} same)")
        console.print(f"held-out at tau {tau:.4f}: FPR {h['fpr']:.4f} (different pairs joined)  FNR {h['fnr']:.4f}")


@judge_app.command("eval")
def evaluate_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="labelled pair file (JSONL: a, b, same)"),
    judge: str = typer.Option("trained", "--judge", help="trained | lexical | embedding | classifier:MODEL | llm"),
    backend: str | None = typer.Option(None, "--backend", help="backend spec the llm judge asks (e.g. vllm:PATH)"),
) -> None:
    """Print AUROC and TNR at 0.2 FNR of a judge on labelled pairs (positive = same answer)."""
    from ttscale.judges.pairwise import evaluate, load_pairs, make_judge

    try:
        ps, y = load_pairs(pairs)
        scores = asyncio.run(_llm_scores(ps, backend)) if judge == "llm" else make_judge(judge).p_same_many(ps)
        m = evaluate(y, scores)
    except TTScaleError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
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
