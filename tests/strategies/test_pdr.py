"""PDR / SR decision logic: the workspace bound, SR = PDR with M=1, sequential vs total budgets."""

from __future__ import annotations

import re

import pytest

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.errors import ConfigError
from ttscale.strategies.registry import make_strategy
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
    # each round refines the previous candidate
    prev = be_sr.requests[1].messages[-1]["content"]
    assert "d0w0" in prev and "d1w0" in be_sr.requests[2].messages[-1]["content"]


def test_sr_config_rejects_parallel_rounds_and_pdr_needs_a_final_single_draft():
    with pytest.raises(ConfigError, match="M_r = 1"):
        make_strategy("sr:schedule=[2,1]")
    with pytest.raises(ConfigError, match="M_R = 1"):
        make_strategy("pdr:schedule=[4,2]")
    assert make_strategy("sr:schedule=[1,1]").config.rounds == 2


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
