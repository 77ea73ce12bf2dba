"""Hogwild! over one shared cache: exactness of each worker's view, cross-worker visibility, step moves."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.native import byte_decode, byte_encode
from ttscale.backends.engine.native import HogwildRun, HogwildSpec, SamplingRow, is_step_end


def _spec(layout: str, workers: int = 2, steps: int = 12, **kw) -> HogwildSpec:
    return HogwildSpec(
        prompt_ids=byte_encode("Solve: 2+3. "), workers=workers, layout=layout, max_steps=steps,
        others_header=byte_encode("\n[others]\n"), own_header=byte_encode("\n[own]\n"),
        pivot=byte_encode("<...>\n"),
        step_prefix=[byte_encode(n) for n in ("A: ", "B: ", "C: ")][:workers],
        check_ids=byte_encode("Quick check? "), check_every=4,
        final_ids=byte_encode(" final answer is \\boxed{"), final_tokens=3,
        sampling=SamplingRow(temperature=1.0, top_p=1.0, seed=7), **kw,
    )


def _ref_last(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([tokens])).logits[0, -1].float()


@pytest.mark.parametrize("layout", ["combined", "contiguous"])
def test_view_logits_equal_plain_forward_of_the_view(native_pair_1layer, layout):
    """With one layer a key depends only on its token and position, so after every re-layout (others
    growing, steps moving into the common block every 3 tokens) a worker's logits must equal a plain
    transformers forward of exactly the tokens its view shows, in view order."""
    hf, model = native_pair_1layer
    seen = []
    run = HogwildRun(model, _spec(layout, workers=3), decode=byte_decode,
                     on_step=lambda s, w, view, new, lg: seen.append((s, w, view + new, lg)),
                     is_boundary=lambda toks: len(toks) >= 3)
    out = run.run()
    assert len(run.common) > 3, "steps should have moved into the common block"
    assert out.forwards >= 12 and len(seen) == 3 * 12
    for s, w, toks, lg in seen:
        torch.testing.assert_close(lg, _ref_last(hf, toks), atol=1e-4, rtol=1e-4, msg=f"step {s} worker {w}")
        if layout == "combined":  # with 3 workers one pivot separates the two others' current steps
            assert byte_decode(toks).count("<...>") == 1


def test_first_step_exact_with_all_layers(native_pair):
    """Two layers, contiguous layout: at the first step every worker's view is prompt + its own header."""
    hf, model = native_pair
    seen = []
    HogwildRun(model, _spec("contiguous", steps=1), decode=byte_decode,
               on_step=lambda s, w, view, new, lg: seen.append((view + new, lg))).run()
    for toks, lg in seen:
        torch.testing.assert_close(lg, _ref_last(hf, toks), atol=1e-4, rtol=1e-4)


def test_token_of_worker_a_visible_to_b_next_step(native_pair):
    _, model = native_pair
    views: dict[tuple[int, int], list[int]] = {}
    news: dict[tuple[int, int], list[int]] = {}
    out = HogwildRun(model, _spec("contiguous", steps=5), decode=byte_decode,
                     on_step=lambda s, w, view, new, lg: (views.__setitem__((s, w), view),
                                                          news.__setitem__((s, w), new))).run()
    a_tokens = out.worker_tokens[0]
    for s in range(1, 5):
        # B's view at step s ends (before B's own step) with everything A wrote up to step s-1.
        a_written = byte_encode("A: ") + a_tokens[:s - 1]
        b_view = views[(s, 1)]
        own_b = len(byte_encode("B: ")) + (s - 1)
        assert b_view[len(b_view) - own_b - len(a_written):len(b_view) - own_b] == a_written
        assert news[(s - 1, 0)][-1] in b_view  # the token A wrote in the previous forward


def test_step_boundary_follows_the_authors_rule():
    """The last token must hold a blank line and the text before it end with sentence punctuation."""
    assert is_step_end("So x = 3.\n\n")
    assert is_step_end("Done!\n\n", last_token="!\n\n")
    assert is_step_end("Is it 4?\n\n\n", last_token="\n\n\n")
    assert is_step_end("Tehdään näin。\n\n")
    assert not is_step_end("Done!\n \n")  # no blank-line token
    assert not is_step_end("So x = 3.\n")
    assert not is_step_end("a list:\n\n")
    assert not is_step_end("So x = 3.\n\nmore", last_token="more")
    assert is_step_end("So x = 3.\n\n**", last_token="\n\n**")  # one token holding the blank line
    assert is_step_end("So x = 3.\n\n", last_token="\n")  # a blank line split over two tokens
    assert not is_step_end("So x = 3.\n\n**", last_token="**")  # ended a token earlier


def test_step_ends_on_real_smollm2_tokens(smol_tiny_backend):
    """SmolLM2 writes ".\n\n**" as '.', '\n', '\n', '**': the step ends on the second newline."""
    tok = smol_tiny_backend.tokenizer
    ids = tok.encode("**Alice [1]:** I add the square of 2.\n\n**Bob", add_special_tokens=False)
    ends = [n for n in range(1, len(ids) + 1) if is_step_end(tok.decode(ids[:n]), tok.decode(ids[n - 1:n]))]
    assert len(ends) == 1 and tok.decode(ids[:ends[0]]).endswith("2.\n\n")


def test_budget_forces_final_answer(native_pair):
    _, model = native_pair
    out = HogwildRun(model, _spec("combined", steps=4), decode=byte_decode).run()
    assert out.finish in ("budget", "eos")
    assert 1 <= len(out.final_tokens) <= 3
    assert out.forwards == 4 + len(out.final_tokens)
    assert out.generated == sum(len(t) for t in out.worker_tokens) + len(out.final_tokens)
    spec = _spec("combined", steps=4)
    text = "".join(byte_decode(t) for _, t in out.transcript)
    assert byte_decode(spec.final_ids) not in text, "the finisher is reported once, as final_tokens"


def test_workspaces_lend_a_free_cache_again_and_a_new_one_when_held(native_pair):
    from ttscale.backends.engine.native import Workspaces, hogwild_blocks

    _, model = native_pair
    spec = _spec("combined", steps=6)
    pool = Workspaces.for_model(model)
    assert Workspaces.for_model(model) is pool
    need = hogwild_blocks(spec)
    with pool.take(need) as (cache, graphs):
        assert graphs is None  # CPU
        assert cache.pool.num_blocks >= need
        first = HogwildRun(model, spec, decode=byte_decode, cache=cache).run()
        used = cache.pool.num_used
        with pool.take(need) as (other, _):
            assert other is not cache  # held by the run above
    with pool.take(need) as (again, _):
        assert again is cache
        again_run = HogwildRun(model, spec, decode=byte_decode, cache=again).run()
        assert again_run.worker_tokens == first.worker_tokens
        assert again.pool.num_used == used  # runs release their segments


def _stopping_spec(steps: int = 40):
    spec = _spec("combined", workers=3, steps=steps)
    spec.stop_on_boxed = False
    spec.eos_ids = list(range(200, 256))  # about one draw in five: workers stop at different steps
    spec.banned_ids = list(range(120, 130))  # never sampled, in the plain and the pipelined loop alike
    return spec


def test_pipelined_loop_matches_the_plain_loop(native_pair):
    """The pipelined loop (each step launched before the previous step's tokens are read; the path CUDA
    graphs take) gives the plain loop's tokens and transcript, through step ends and workers stopping."""
    _, model = native_pair
    outs = {}
    for pipelined in (False, True):
        run = HogwildRun(model, _stopping_spec(), decode=byte_decode, is_boundary=lambda t: len(t) >= 6,
                         pipelined=pipelined)
        outs[pipelined] = (run.run(), run)
    (plain, _), (piped, run) = outs[False], outs[True]
    assert piped.worker_tokens == plain.worker_tokens
    assert not {t for toks in plain.worker_tokens for t in toks} & set(run.spec.banned_ids)
    assert piped.transcript == plain.transcript
    assert (piped.forwards, piped.generated, piped.forced) == (plain.forwards, plain.generated, plain.forced)
    assert sum(1 for w, _ in plain.transcript if w >= 0) > 3, "steps should have moved into the common block"
    stops = sum(1 for toks in plain.worker_tokens if len(toks) < plain.forwards - 3)
    assert stops >= 1, "a worker should have stopped early (EOS)"
    assert 1 <= run.dropped <= stops + 1, "only stops drop a step launched ahead, not step ends"


def test_every_kept_token_is_written_once_in_its_workers_steps(native_pair):
    """A step ends with its boundary token; the next opens with the worker's header. Reading a worker's
    steps in order, minus the forced headers, gives exactly the tokens it kept."""
    _, model = native_pair
    spec = _stopping_spec(steps=30)
    spec.eos_ids, spec.final_ids = [], []  # no stops, no forced final answer written after the budget
    out = HogwildRun(model, spec, decode=byte_decode, is_boundary=lambda t: len(t) >= 6, pipelined=True).run()
    for w, kept in enumerate(out.worker_tokens):
        steps = [toks for i, toks in out.transcript if i == w]
        assert len(steps) >= 3
        header = spec.step_prefix[w]
        written = []
        for toks in steps:
            body = toks[len(header):] if toks[:len(header)] == header else toks
            if body[:len(spec.check_ids)] == spec.check_ids:
                body = body[len(spec.check_ids):]
            written += body
        for toks in steps[:-1]:
            assert len(toks) >= 6, "a finished step holds its boundary token"
        assert written == kept


# ------------------------------------------------------------------------------ the authors' prompting

@pytest.fixture(scope="module")
def smol_tiny_backend(tmp_path_factory):
    """Engine backend over a tiny random Llama with the real SmolLM2 tokenizer (and its chat template)."""
    from ttscale.backends.engine import EngineBackend, EngineConfig
    from ttscale.testing import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("hw") / "m", "llama", seed=5)
    be = EngineBackend(EngineConfig(model=str(folder), dtype="float32", device="cpu", num_blocks=256))
    yield be
    be.engine.close()


def _strategy_spec(be, steps: int = 8, **cfg):
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    config = {"max_tokens": steps, "temperature": 1.0, "top_p": 1.0, "seed": 1, **cfg}
    strat = make_strategy("hogwild", **config)
    return strat.build_spec(Problem(prompt="What is 17 * 3?"), be)


def test_worker_views_hold_the_authors_markers_and_indexed_step_headers(smol_tiny_backend):
    """Bob's view, decoded with the SmolLM2 tokenizer: the collaboration prompt, Alice's finished steps
    headed `**Alice [k]:**`, the others/own work-in-progress markers with the `<...>` pivot, and Bob's own
    current step under its index. Step ends are forced every 5 tokens."""
    be = smol_tiny_backend
    tok = be.tokenizer
    spec, missing = _strategy_spec(be, steps=12)
    assert missing == ["</think>"]  # SmolLM2 has no </think> token
    views: dict[tuple[int, int], str] = {}
    HogwildRun(be.engine.model, spec, decode=lambda t: tok.decode(t), is_boundary=lambda t: len(t) >= 5,
               on_step=lambda s, w, view, new, lg: views.__setitem__((s, w), tok.decode(view + new))).run()
    first = views[(1, 1)]  # at step 0 Alice's first header is being written in the same forward
    assert "# Collaborative Reasoning" in first and "# Solve the following problem" in first
    assert "What is 17 * 3?" in first
    tail = first[first.rindex("### Work in progress (others)"):]
    assert tail.startswith("### Work in progress (others)\n\n**Alice [1]:** Hi, I'm Alice. Here's how we can")
    assert "<...>\n\n### Work in progress (own)\n\n**Bob [1]:** Hi, I'm Bob." in tail
    last = views[(11, 1)]
    common = last[:last.rindex("### Work in progress (others)")]
    wip = last[last.rindex("### Work in progress (others)"):]
    assert "**Alice [2]:** " in common and "**Bob [2]:** " in common  # finished steps, in the common block
    own_index = max(int(x) for x in __import__("re").findall(r"\*\*Bob \[(\d+)\]:\*\* ", wip))
    assert own_index >= 3


def test_banned_tokens_get_probability_zero():
    """The mask sends banned logits to -inf: neither sampling (any seed, high temperature) nor argmax picks
    them, even when they are the most likely tokens."""
    from ttscale.backends.engine.native_common import _sample, ban_mask

    class _Model:
        class cfg:  # stands in for ModelConfig
            vocab_size = 50
            device = torch.device("cpu")

    banned = [3, 7, 11]
    logits = torch.randn(64, 50)
    logits[:, banned] = 20.0  # by far the likeliest
    mask = ban_mask(_Model, banned)
    rows = [(2.0, 1.0, 0, seed, step) for seed, step in zip(range(64), range(64), strict=True)]
    toks, _ = _sample(_Model, logits, rows, mask)
    assert not set(toks) & set(banned)
    greedy, _ = _sample(_Model, logits, [(0.0, 1.0, 0, 0, 0)] * 64, mask)
    assert not set(greedy) & set(banned)
    unmasked, _ = _sample(_Model, logits, rows)
    assert set(unmasked) <= set(banned), "without the mask the banned tokens win: the mask is what stops them"


def test_eos_stops_a_worker_only_when_not_banned(smol_tiny_backend):
    """Greedy workers: taking Alice's first greedy token as EOS stops her at once when EOS is allowed (a
    self-consistency branch ends there); with the authors' ban she writes all her steps and never emits it."""
    be = smol_tiny_backend
    spec, _ = _strategy_spec(be, steps=6, temperature=0.0)
    spec.stop_on_boxed, spec.final_ids, spec.banned_ids = False, [], []
    free = HogwildRun(be.engine.model, spec).run()
    eos = free.worker_tokens[0][0]
    spec.eos_ids = [eos]
    stopped = HogwildRun(be.engine.model, spec).run()
    assert stopped.worker_tokens[0] == [] and len(stopped.worker_tokens[1]) == 6
    spec.banned_ids = [eos]
    banned = HogwildRun(be.engine.model, spec).run()
    assert len(banned.worker_tokens[0]) == 6 and eos not in banned.worker_tokens[0]
    assert banned.worker_tokens[1] != [] and banned.finish == "budget"


async def test_strategy_bans_the_authors_tokens_present_in_the_tokenizer(smol_tiny_backend):
    from ttscale.controller import Context
    from ttscale.strategies.registry import make_strategy
    from ttscale.types import Problem

    be = smol_tiny_backend
    vocab = be.tokenizer.get_vocab()
    strat = make_strategy("hogwild:max_tokens=4,final_tokens=2,seed=2")
    res = await strat.run(Problem(prompt="1+1?"), Context(be))
    assert set(res.decision["banned_tokens"]) >= {vocab["#"], vocab["<|im_start|>"], vocab["<|im_end|>"]}
    assert res.decision["banned_missing"] == ["</think>"]
    for t in res.traces:
        assert not set(t.token_ids) & set(res.decision["banned_tokens"])
    off = await make_strategy("hogwild:max_tokens=2,final_tokens=1,ban_tokens=false").run(
        Problem(prompt="1+1?"), Context(be))
    assert off.decision["banned_tokens"] == []
