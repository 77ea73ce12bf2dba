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
        step_prefix=[byte_encode(n) for n in ("A: ", "B: ", "C: ")][:workers],
        check_ids=byte_encode("Quick check? "), check_every=4, final_ids=byte_encode(" final answer is \\boxed{"),
        final_tokens=3, sampling=SamplingRow(temperature=1.0, top_p=1.0, seed=7), **kw,
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


def test_step_boundary_and_quick_check():
    assert is_step_end("So x = 3.\n\n")
    assert is_step_end("Done!\n \n")
    assert not is_step_end("So x = 3.\n")
    assert not is_step_end("a list:\n\n")


def test_budget_forces_final_answer(native_pair):
    _, model = native_pair
    out = HogwildRun(model, _spec("combined", steps=4), decode=byte_decode).run()
    assert out.finish in ("budget", "eos")
    assert 1 <= len(out.final_tokens) <= 3
    assert out.forwards == 4 + len(out.final_tokens)
    assert out.generated == sum(len(t) for t in out.worker_tokens) + len(out.final_tokens)


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
        assert HogwildRun(model, spec, decode=byte_decode, cache=again).run().worker_tokens == first.worker_tokens
        assert again.pool.num_used == used  # runs release their segments


def _stopping_spec(steps: int = 40):
    spec = _spec("combined", workers=3, steps=steps)
    spec.stop_on_boxed = False
    spec.eos_ids = list(range(200, 256))  # about one draw in five: workers stop at different steps
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
