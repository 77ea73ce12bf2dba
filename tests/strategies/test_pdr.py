"""PDR / SR decision logic: the workspace bound and what it keeps, SR = PDR with M=1, sequential vs total
budgets (the distill call's prompt on the critical path), and a run where PDR and self-consistency differ."""

from __future__ import annotations

import re

import pytest

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.budget import Budget
from ttscale.controller import Context
from ttscale.errors import ConfigError
from ttscale.strategies.registry import make_strategy
from ttscale.strategies.self_consistency import SelfConsistency
from ttscale.types import Problem

P = Problem(id="p", prompt="What is 6 times 7?")
WS = re.compile(r"<workspace>\n(.*)\n</workspace>", re.DOTALL)


def scripted(draft_words: int = 120) -> ScriptedBackend:
    def script(req, i):
        content = req.messages[-1]["content"]
        if "Write a short summary" in content:
            return Script(text=" ".join(f"summary{j}" for j in range(400)))
        return Script(text=" ".join(f"d{i}w{j}" for j in range(draft_words)) + f" \\boxed{{{42 + i % 2}}}")

    return ScriptedBackend(script)


async def run(spec: str, be=None, **kw):
    be = be or scripted()
    async with Context(be, seed=0) as ctx:
        res = await make_strategy(spec, **kw).run(P, ctx)
    return be, res


def workspaces(be: ScriptedBackend) -> list[str]:
    out = []
    for r in be.requests:
        m = WS.search(r.messages[-1]["content"])
        if m:
            out.append(m.group(1))
    return out


@pytest.mark.parametrize("distill", ["summary", "topk", "randomk"])
async def test_no_prompt_carries_more_than_kappa_workspace_tokens(distill):
    be, res = await run(f"pdr:schedule=[3,2,1],kappa=50,distill={distill},k=2")
    ws = workspaces(be)
    assert len(ws) == 3  # rounds 2 and 3 each see a workspace
    counts = [len(await be.tokenize(w)) for w in ws]
    assert max(counts) <= 50
    assert max(counts) >= 40  # the bound binds: drafts were much longer than kappa
    assert res.fallbacks == []
    assert res.answer in ("42", "43")


async def test_without_tokenize_bytes_bound_the_workspace_and_the_result_says_so():
    be = scripted()
    be.capabilities = be.capabilities.model_copy(update={"tokenize": False})
    be, res = await run("pdr:schedule=[2,1],kappa=60,distill=topk,k=2", be)
    (ws,) = workspaces(be)
    assert len(ws.encode()) <= 60 and res.fallbacks and "UTF-8 bytes" in res.fallbacks[0]


async def test_sr_is_pdr_with_one_draft_per_round():
    be_sr, sr = await run("sr:rounds=3,kappa=40")
    be_pdr, pdr = await run("pdr:schedule=[1,1,1],kappa=40,distill=topk,k=1")
    assert [r.messages for r in be_sr.requests] == [r.messages for r in be_pdr.requests]
    assert len(be_sr.requests) == 3 and sr.answer == pdr.answer
    assert sr.usage.generated_tokens == pdr.usage.generated_tokens
    assert sr.usage.sequential_tokens == sr.usage.generated_tokens  # one chain: all of it is sequential
    # each round refines the previous candidate: its end and its answer, with a note of what was cut
    prev, prev2 = (WS.search(be_sr.requests[k].messages[-1]["content"]).group(1) for k in (1, 2))
    assert prev.endswith("d0w119 \\boxed{42}") and "d0w0 " not in prev and "beginning is cut: 121 tokens" in prev
    assert prev2.endswith("d1w119 \\boxed{43}")


async def test_topk_workspace_keeps_every_drafts_conclusion_and_answer():
    be, res = await run("pdr:schedule=[3,1],kappa=60,distill=topk,k=2")
    (ws,) = workspaces(be)
    attempts = ws.split("\n\n")
    assert len(attempts) == 2 and len(await be.tokenize(ws)) <= 60 and res.answer in ("42", "43")
    for a in attempts:
        assert "its beginning is cut: 121 tokens in all" in a
        assert re.search(r"d\dw119 \\boxed\{4[23]\}$", a)  # the draft's last words and its answer


def test_sr_config_rejects_parallel_rounds_and_pdr_needs_a_final_single_draft():
    with pytest.raises(ConfigError, match="M_r = 1"):
        make_strategy("sr:schedule=[2,1]")
    with pytest.raises(ConfigError, match="M_R = 1"):
        make_strategy("pdr:schedule=[4,2]")
    assert make_strategy("sr:schedule=[1,1]").config.rounds == 2


def prompt_len(req) -> int:
    """The scripted backend's prompt count: words of every message."""
    return sum(len(str(m.get("content", "")).split()) for m in req.messages)


async def test_the_summary_calls_prompt_is_on_the_sequential_path():
    be, res = await run("pdr:schedule=[3,2,1],kappa=50,distill=summary")
    reqs = be.requests  # round 1 (3), summary, round 2 (2), summary, round 3 (1)
    assert ["Write a short summary" in r.messages[-1]["content"] for r in reqs] == [False] * 3 + [True] + \
        [False] * 2 + [True, False]
    lens = [prompt_len(r) for r in reqs]
    expected = max(lens[0:3]) + lens[3] + max(lens[4:6]) + lens[6] + lens[7]
    assert res.usage.sequential_prompt_tokens == expected
    assert lens[3] > 3 * 120  # the summary reads every draft


async def test_the_summary_of_short_drafts_is_bounded_by_their_length_not_only_kappa():
    """Drafts of 6 tokens each (a request's small max_tokens): the summary call may generate at most their
    total, not kappa's 2,048; with long drafts kappa binds."""
    be, _ = await run("pdr:schedule=[3,1],distill=summary,max_tokens=6")
    drafts, (summary,) = be.requests[:3], [r for r in be.requests if "Write a short summary" in
                                             r.messages[-1]["content"]]
    assert all(r.sampling.max_tokens == 6 for r in drafts)
    assert summary.sampling.max_tokens == 3 * 6
    be, _ = await run("pdr:schedule=[3,1],kappa=50,distill=summary")
    (summary,) = [r for r in be.requests if "Write a short summary" in r.messages[-1]["content"]]
    assert summary.sampling.max_tokens == 50


async def test_a_sequential_io_budget_counts_the_distill_prompt():
    _be, full = await run("pdr:schedule=[3,2,1],kappa=50,distill=summary")
    gen_only, with_prompts = full.usage.sequential_tokens, full.usage.sequential_tokens + \
        full.usage.sequential_prompt_tokens
    limit = gen_only + 10  # generated tokens alone never reach it; with the prompts read on the path they do
    assert limit < with_prompts
    be = scripted()
    async with Context(be, seed=0, budget=Budget(sequential_io_tokens=limit)) as ctx:
        res = await make_strategy("pdr:schedule=[3,2,1],kappa=50,distill=summary").run(P, ctx)
    assert res.decision["budget_hit"] == "sequential_io_tokens"
    assert res.usage.sequential_tokens < gen_only
    assert res.usage.generated_tokens < full.usage.generated_tokens
    assert any("budget ran out" in f for f in res.fallbacks)


def agrees_with_workspace(req, i):
    """Round 1: two unlikely drafts answer 5, one likely draft answers 7. Later rounds adopt the answer
    the workspace shows, and answer 5 when it shows none."""
    content = req.messages[-1]["content"]
    m = WS.search(content)
    if m is None:
        seven = i % 3 == 2
        body = " ".join(f"r{i}w{j}" for j in range(150))
        return Script(text=f"{body} \\boxed{{{7 if seven else 5}}}", logprob=-0.1 if seven else -2.0)
    return Script(text="refined \\boxed{7}" if "\\boxed{7}" in m.group(1) or "answer of this attempt: 7"
                  in m.group(1) else "refined \\boxed{5}")


async def test_pdr_answer_follows_the_distilled_workspace_where_self_consistency_votes_the_majority():
    """Defining rule: the final draft refines from the distilled workspace (topk by likelihood), so it
    answers 7 where a vote over the same drafts says 5. It fails if the workspace drops drafts' ends."""
    be, res = await run("pdr:schedule=[3,1],kappa=40,distill=topk,k=1", ScriptedBackend(agrees_with_workspace))
    async with Context(ScriptedBackend(agrees_with_workspace), seed=0) as ctx:
        sc = await SelfConsistency({"n": 3}).run(P, ctx)
    assert sc.answer == "5"
    (ws,) = workspaces(be)
    assert "r2w149 \\boxed{7}" in ws and "r2w0 " not in ws
    assert res.answer == "7"


async def test_sequential_and_total_budgets_are_reported_separately():
    _be, res = await run("pdr:schedule=[3,2,1],kappa=50,distill=summary")
    u = res.usage
    # round 1: 3 drafts of 121 tokens; summary <= 50; round 2: 2 drafts; summary; round 3: 1 draft
    assert u.generated_tokens == 6 * 121 + 2 * 50
    assert u.sequential_tokens == 3 * 121 + 2 * 50
    assert 0 < u.sequential_prompt_tokens < u.prompt_tokens
    b = res.decision["budgets"]
    assert b["sequential"] == u.sequential_tokens + u.sequential_prompt_tokens
    assert b["total"] == u.generated_tokens + u.prompt_tokens and b["total"] > b["sequential"]


async def test_the_eval_store_keeps_sequential_prompt_tokens(tmp_path):
    from ttscale.evals.store import ResultStore

    _be, res = await run("pdr:schedule=[2,1],kappa=50,distill=summary")
    db = tmp_path / "results.sqlite"
    with ResultStore(db) as store:
        info = store.ensure_run(dataset="d", strategy="pdr", spec="pdr", config=res.config, backend="scripted",
                                total=1)
        assert store.add(info, 0, 0, res, "42")
    with ResultStore(db) as store:  # reopened: the added column is there once, the value kept
        (row,) = store.rows(info.run_id)
    assert row.sequential_prompt_tokens == res.usage.sequential_prompt_tokens > 0
