"""FFS family decision logic on the scripted backend (real-backend races are in test_real_backends.py)."""

from __future__ import annotations

from ttscale.backends.scripted import Script, ScriptedBackend
from ttscale.controller import Context
from ttscale.strategies.registry import make_strategy
from ttscale.types import BranchStatus, Problem

P = Problem(id="p", prompt="What is 1+1?")


def words(n: int, answer: str) -> str:
    return " ".join(["step"] * n + [f"\\boxed{{{answer}}}"])


async def run(spec: str, scripts, **kw):
    be = ScriptedBackend(scripts)
    strat = make_strategy(spec, **kw)
    async with Context(be, seed=0) as ctx:
        res = await strat.run(P, ctx)
    return be, res


async def test_first_finished_wins_and_the_rest_are_aborted_with_saved_tokens():
    lengths = [30, 12, 25, 40]
    scripts = [Script(text=words(n, str(i)), delay_s=0.002) for i, n in enumerate(lengths)]
    be, res = await run("ffs:n=4,max_tokens=100", scripts)
    assert res.answer == "1" and res.decision["winner"] == "b1"
    assert {"b0", "b2", "b3"} <= set(be.aborted)
    assert all(be.tokens_sent[f"b{i}"] < lengths[i] + 1 for i in (0, 2, 3))  # losers stopped mid-script
    aborted = [t for t in res.traces if t.id != "b1"]
    assert all(t.status is BranchStatus.aborted and t.finish_reason == "abort" for t in aborted)
    assert res.usage.aborted == 3
    assert res.usage.saved_tokens == sum(100 - t.num_tokens for t in aborted) > 0
    assert res.usage.sequential_tokens == 13 and res.fallbacks == []


async def test_length_limit_counts_as_finishing():
    scripts = [Script(text=words(50, "a"), delay_s=0.001), Script(text=words(50, "b"), delay_s=0.004)]
    be, res = await run("ffs:n=2,max_tokens=10", scripts)
    win = next(t for t in res.traces if t.id == res.decision["winner"])
    assert win.id == "b0" and win.finish_reason == "length" and "b1" in be.aborted and be.tokens_sent["b1"] < 10


async def test_sync_mode_reports_its_emulation_and_keeps_the_shortest():
    scripts = [Script(text=words(8, "x"), delay_s=0.002), Script(text=words(5, "y"), delay_s=0.002)]
    _, res = await run("sync-ffs:n=2", scripts)
    assert res.decision["winner"] == "b1" and res.answer == "y"
    assert res.fallbacks and "lockstep" in res.fallbacks[0]
    _, res2 = await run("ffs:n=2,mode=sync", scripts)
    assert res2.fallbacks == res.fallbacks


async def test_ffs_k_votes_over_the_k_first():
    # finishing order b3 (4 words), b1 (6), b0 (8), then b2 (20): k=3 votes over b3, b1, b0
    scripts = [Script(text=words(n, a), delay_s=0.002) for n, a in [(8, "5"), (6, "7"), (20, "7"), (4, "5")]]
    be, res = await run("ffs-k:n=4,k=3", scripts)
    assert res.decision["voters"] == ["b3", "b1", "b0"]
    assert res.answer == "5"  # 2 votes for 5 against 1 for 7
    assert be.tokens_sent["b2"] < 21 and res.traces[2].status is BranchStatus.aborted


async def test_short_m_stops_once_m_finished():
    scripts = [Script(text=words(n, a), delay_s=0.002) for n, a in [(3, "1"), (30, "2"), (5, "2"), (40, "3")]]
    be, res = await run("short-m:k=4,m=2", scripts)
    assert res.decision["voters"] == ["b0", "b2"]
    assert res.answer == "1"  # a 1-1 tie goes to the shortest (earliest finished)
    assert [t.id for t in res.traces if t.status is BranchStatus.aborted] == ["b1", "b3"]
    assert be.tokens_sent["b1"] < 31 and be.tokens_sent["b3"] < 41


async def test_last_finish_takes_the_longest():
    scripts = [Script(text=words(n, str(n)), delay_s=0.001) for n in (5, 15, 9)]
    _be, res = await run("last-finish:n=3", scripts)
    assert res.answer == "15" and all(t.status is BranchStatus.finished for t in res.traces)


async def test_no_finisher_gives_no_answer_and_says_so():
    scripts = [Script(text="x", error="boom")] * 2
    _, res = await run("ffs:n=2", scripts)
    assert res.answer is None and res.decision["winner"] is None
    assert res.decision["log"][0]["message"] == "no trace finished"


async def test_a_backend_without_abort_is_reported():
    be = ScriptedBackend([Script(text=words(n, "1"), delay_s=0.001) for n in (3, 9)])
    be.capabilities = be.capabilities.model_copy(update={"abort": False})
    async with Context(be, seed=0) as ctx:
        res = await make_strategy("ffs:n=2").run(P, ctx)
    assert res.fallbacks and "no abort" in res.fallbacks[0]
