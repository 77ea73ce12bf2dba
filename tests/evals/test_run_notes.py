"""What an eval says about the problems it could not answer: a budget that ran out before any branch gave an
answer (a wrong answer whose reason is in the Result, samples.jsonl and the run's line), a replayed bank that
refused (an error a rerun cannot fix, unlike other failures), and a bank of another dataset (refused before
anything runs). The scripted model and banks recorded from it stand in for a model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.evals import record_bank
from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.errors import ConfigError
from ttscale.evals.cli import outcome_line
from ttscale.evals.datasets import Dataset, load_dataset
from ttscale.evals.outputs import sample_records
from ttscale.evals.replay import ReplayBackend
from ttscale.evals.runner import RunOutcome, evaluate
from ttscale.evals.store import ResultStore, RunInfo
from ttscale.strategies.base import budget_note
from ttscale.strategies.registry import make_strategy
from ttscale.types import Problem

LONG = Script(text=" ".join(f"w{i}" for i in range(200)) + " \\boxed{5}")
ENV = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("spec", ["single", "self-consistency:n=2", "ffs:n=2", "pdr:schedule=[2,1],distill=topk"])
async def test_a_budget_spent_before_any_answer_is_in_the_results_fallbacks(spec):
    async with Context(ScriptedBackend([LONG]), budget=Budget(total_tokens=30)) as ctx:
        res = await make_strategy(spec, max_tokens=1000).run(Problem(prompt="What is 2 + 3?"), ctx)
    assert res.answer is None and res.error is None and res.decision["budget_hit"] == "total_tokens"
    assert res.fallbacks == [budget_note("total_tokens")]
    async with Context(ScriptedBackend([LONG]), budget=Budget(total_tokens=3000)) as ctx:  # room to answer
        res = await make_strategy(spec, max_tokens=1000).run(Problem(prompt="What is 2 + 3?"), ctx)
    assert res.answer == "5" and not any("budget" in f for f in res.fallbacks)


async def test_an_eval_says_which_problems_ran_out_of_budget(tmp_path):
    """They are answers (wrong), not errors: a rerun would spend the same budget, so nothing is retried; the
    run's line and each sample say why there is no answer."""
    ds = load_dataset("smoke", limit=3)
    store = ResultStore(tmp_path / "r.db")
    (o,) = await evaluate(ds, ["self-consistency:n=2,max_tokens=1000"], ScriptedBackend([LONG]), store,
                          backend_spec="scripted", budget=Budget(total_tokens=30))
    assert (o.solved, o.errors, o.out_of_budget) == (3, 0, 3)
    assert store.count(o.run.run_id, "error") == 0
    line = outcome_line(o)
    assert "3 solved now (3 with no answer: the budget ran out" in line and "failed" not in line
    samples = sample_records(store, o.run, ds)
    assert all(s.answer is None and s.correct is False and s.error is None for s in samples)
    assert all(s.fallbacks == [budget_note("total_tokens")] for s in samples)
    store.close()


async def test_problems_the_bank_refused_are_not_promised_a_retry(tmp_path):
    """A request the bank cannot serve as recorded fails the same way on every rerun: the run's line says
    so, apart from failures a rerun may fix."""
    ds = load_dataset("chain-sum", limit=2, seed=5)
    bank, _, _ = await record_bank(tmp_path / "bank.db", ds, "self-consistency:n=2", tmp_path / "live.db")
    backend = ReplayBackend(bank.path)
    store = ResultStore(tmp_path / "replay.db")
    (o,) = await evaluate(ds, ["self-consistency:n=3"], backend, store, backend_spec="replay")
    await backend.close()
    assert (o.errors, o.refused, o.solved) == (2, 2, 0)
    line = outcome_line(o)
    assert "2 refused by the trace bank" in line and "a rerun fails them again" in line
    assert "a rerun retries them" not in line
    store.close()

    run = RunInfo(run_id="r", dataset="d", strategy="s", spec="s", config_hash="h", config={}, backend="b",
                  total=5, status="error", created_at=0.0)
    mixed = outcome_line(RunOutcome(run=run, skipped=0, solved=2, errors=3, refused=1))
    assert "2 failed[/red] (stored as errors; a rerun retries them)" in mixed and "1 refused" in mixed


async def test_a_bank_of_another_dataset_is_refused_before_anything_runs(tmp_path):
    ds = load_dataset("chain-sum", limit=2, seed=0)
    bank, _, _ = await record_bank(tmp_path / "bank.db", ds, "single", tmp_path / "live.db")
    bank.set_meta(dataset=ds.key)  # what `ttscale bank record` / `eval --record-bank` note
    bank.close()
    other = load_dataset("chain-sum", limit=2, seed=1)
    backend = ReplayBackend(tmp_path / "bank.db")
    store = ResultStore(tmp_path / "replay.db")
    with pytest.raises(ConfigError) as info:
        await evaluate(other, ["single"], backend, store, backend_spec="replay")
    assert "'chain-sum@seed0'" in str(info.value) and "'chain-sum@seed1'" in str(info.value)
    assert store.runs() == [] and backend.served == []
    (o,) = await evaluate(ds, ["single"], backend, store, backend_spec="replay")  # its own dataset replays
    assert o.solved == 2 and o.errors == 0
    part = Dataset(ds.name, ds.problems[:1], ds.source, f"{ds.key}[:1]", ds.grader)  # a slice, as the study's
    (o,) = await evaluate(part, ["single"], backend, ResultStore(tmp_path / "part.db"), backend_spec="replay")
    assert o.solved == 1 and o.errors == 0
    await backend.close()
    store.close()

    cli = subprocess.run([sys.executable, "-m", "ttscale.cli", "eval", "--dataset", "chain-sum", "--seed", "1",
                          "--limit", "2", "--replay", str(tmp_path / "bank.db"), "--db", str(tmp_path / "cli.db"),
                          "--no-progress", "--strategy", "single"], env=ENV, check=False, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert "'chain-sum@seed0'" in cli.stderr and "'chain-sum@seed1'" in cli.stderr
