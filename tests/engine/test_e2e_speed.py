"""What keeps the user path as fast as the engine: batched hand-offs spaced by what consuming them costs,
Rust detokenisation, the CPU top-p head, graph layouts that do not change as branches finish, a quiet
cyclic GC while the engine runs, and chats encoded once for their n samples."""

import asyncio
import copy
import gc
import time

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttscale.backends.engine import Engine, EngineBackend, SamplingParams
from ttscale.backends.engine.handoff import MAX_HANDOFF_GAP_S, Channel, Inbox, StreamReader, merge_outputs
from ttscale.backends.engine.kv_cache import KVCache, Sequence
from ttscale.backends.engine.model import ForwardItem, bucket
from ttscale.backends.engine.request import Request, RequestOutput, Text
from ttscale.backends.engine.sampler import SamplingTensors, filtered_pick, uniform
from ttscale.types import GenerationRequest, SamplingSpec


def test_merge_outputs_concatenates_in_order_and_keeps_the_last_finish():
    a = RequestOutput("r", [1, 2], [-0.1, -0.2], [{1: -0.1}, {2: -0.2}], "ab", prompt_tokens=5)
    b = RequestOutput("r", [3], [-0.3], None, "c", finished=True, finish_reason="stop", prompt_tokens=5)
    m = merge_outputs([a, b])
    assert (m.token_ids, m.logprobs, m.text) == ([1, 2, 3], [-0.1, -0.2, -0.3], "abc")
    assert m.top_logprobs == [{1: -0.1}, {2: -0.2}, {}]
    assert m.finished and m.finish_reason == "stop" and m.prompt_tokens == 5
    assert merge_outputs([a]) is a


_output = st.builds(
    lambda toks, tops, text: RequestOutput("r", toks, [-0.5 * t for t in toks],
                                           [{t: -0.5 * t} for t in toks] if tops else None, text),
    st.lists(st.integers(0, 99), max_size=4), st.booleans(), st.text(max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.lists(_output, min_size=1, max_size=6), st.booleans())
def test_merge_outputs_is_the_plain_concatenation(outs, finished):
    outs[-1].finished = finished
    m = merge_outputs(outs)
    assert m.token_ids == [t for o in outs for t in o.token_ids]
    assert m.logprobs == [lp for o in outs for lp in o.logprobs]
    assert m.text == "".join(o.text for o in outs)
    if len(outs) > 1:
        want = None
        if any(o.top_logprobs for o in outs):
            want = [d for o in outs for d in (o.top_logprobs or [{} for _ in o.token_ids])]
        assert m.top_logprobs == want
    assert m.finished == finished and m.request_id == "r"


class _NoInbox:
    def put_ready(self, sink):
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 99), st.text(max_size=3), st.booleans()), min_size=1, max_size=30),
       st.sampled_from(["stop", "length", "abort"]), st.integers(0, 4), st.booleans())
def test_pull_takes_add_up_to_what_the_request_published(steps, reason, cut, logprobs):
    """Whatever steps fall between two takes, the takes concatenate to the request's final tokens,
    logprobs and text (text cut back to a stop string included), and the finish comes last, once."""
    r = Request("r", [1, 2, 3], SamplingSpec(logprobs=2 if logprobs else None), None, seed=0)
    pull = StreamReader(_NoInbox())
    pull.bind(r)
    got_ids, got_lps, got_tops, got_text, finishes = [], [], [], "", []

    def take():
        nonlocal got_text
        out = pull.take()
        if out is not None:
            _, ids, lps, tops, text, why, _ = out
            got_ids.extend(ids)
            got_lps.extend(lps)
            got_tops.extend(tops or [])
            got_text += text
            finishes.append(why)

    for k, (tok, piece, read_now) in enumerate(steps):
        r.output_ids.append(tok)
        r.logprobs.append(-tok / 10)
        if logprobs:
            r.top_logprobs.append({tok: -tok / 10})
        r.text.append(piece)
        last = k == len(steps) - 1
        if last:  # a stop string found in the tail: the text is cut back, maybe below what was read
            r.text.cut(max(0, len(r.text) - cut))
        r.published = (len(r.output_ids), len(r.text), reason if last else None, None)
        if read_now:
            take()
    take()
    take()
    assert got_ids == r.output_ids and got_lps == r.logprobs
    assert got_tops == (r.top_logprobs if logprobs else [])
    final = str(r.text)
    assert final.startswith(got_text[:len(final)]) and len(got_text) >= len(final)
    assert got_text[len(final):] == "" or cut > 0  # text beyond the final one only if it was read before the cut
    assert finishes[-1] == reason and finishes.count(reason) == 1 and all(f is None for f in finishes[:-1])
    assert pull.take() is None


def test_pull_of_a_fork_child_reads_only_what_came_after_the_fork():
    parent = Request("p", [1, 2], SamplingSpec(), None, seed=0, output_ids=[5, 6], logprobs=[-0.5, -0.6],
                     text=Text("ab"))
    child = Request("c", [1, 2], SamplingSpec(logprobs=1), None, seed=1, output_ids=list(parent.output_ids),
                    logprobs=list(parent.logprobs), text=parent.text.copy(), published=(2, 2, None, None))
    pull = StreamReader(_NoInbox())
    pull.bind(child)
    assert pull.take() is None
    child.output_ids.append(7)
    child.logprobs.append(-0.7)
    child.top_logprobs.append({7: -0.7})  # the child asks for logprobs its parent did not
    child.text.append("c")
    child.published = (3, 3, "length", None)
    _, ids, lps, tops, text, why, _ = pull.take()
    assert (ids, lps, tops, text, why) == ([7], [-0.7], [{7: -0.7}], "c", "length")


async def test_a_reader_that_took_its_finish_before_the_wake_does_not_hold_up_the_others():
    """The final output read before the hand-off that announced it: the wake that follows is a no-op,
    and the readers queued after it are still woken (a failing wake had stopped the whole drain)."""
    loop = asyncio.get_running_loop()
    inbox = Inbox(loop, 0.0)
    first, second = StreamReader(inbox), StreamReader(inbox)
    second.waiter = woken = loop.create_future()  # its consumer waits, as `_stream` does when nothing is new
    a = Request("a", [1], SamplingSpec(), None, seed=0)
    b = Request("b", [1], SamplingSpec(), None, seed=1)
    first.bind(a)
    second.bind(b)
    a.output_ids.append(3)
    a.logprobs.append(-0.1)
    a.published = (1, 0, "stop", None)
    a.queued = True
    first.ready(a)  # as the engine thread does; the drain is now pending
    b.output_ids.append(4)
    b.logprobs.append(-0.2)
    b.published = (1, 0, None, None)
    b.queued = True
    second.ready(b)
    assert first.take()[5] == "stop"  # read before the drain ran
    await asyncio.wait_for(woken, 5)
    assert first.take() is None and not a.queued and not b.queued
    assert second.take()[1] == [4]


def test_decode_stream_text_equals_decode_and_survives_a_copy(smollm2_backend):
    tok = smollm2_backend.tokenizer
    eng = Engine(smollm2_backend.engine.model, tok, num_blocks=64, block_size=16)
    ids = tok.encode("Grüße, 日本語 and 17 * 23 = 391.<|im_end|> done", add_special_tokens=False)
    r = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=1, detokenize=False))[0]
    r.output_ids, r.text, r.detok = [], Text(), None
    pieces = []
    for i, t in enumerate(ids):
        r.output_ids.append(t)
        pieces.append(eng.detokenizer.step(r))
        if i == 4:
            twin = copy.copy(r)
            twin.output_ids, twin.text, twin.detok = list(r.output_ids), r.text.copy(), copy.copy(r.detok)
    assert r.detok is not False  # the Rust DecodeStream path ran
    assert "".join(pieces) == str(r.text) == tok.decode(ids, skip_special_tokens=True)
    for t in ids[5:]:
        twin.output_ids.append(t)
        eng.detokenizer.step(twin)
    assert str(twin.text) == str(r.text)


async def test_stream_batches_tokens_into_fewer_deltas(tiny_model_dir):
    """With a long hand-off interval, deltas carry several tokens, and nothing is lost or reordered."""
    from ttscale.backends.engine import EngineConfig

    be = EngineBackend(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", num_blocks=256,
                                    stream_interval_ms=500))
    try:
        async def one(i: int) -> list:
            req = GenerationRequest(request_id=f"b{i}", prompt="count with me",
                                    sampling=SamplingSpec(temperature=0.0, max_tokens=24, ignore_eos=True))
            return [d async for d in be.generate(req)]

        runs = await asyncio.gather(*(one(i) for i in range(4)))
    finally:
        await be.close()
    for ds in runs:
        ids = [t for d in ds for t in d.token_ids]
        assert len(ids) == 24 and ds[-1].finished and ds[-1].finish_reason == "length"
        assert len(ds) < 24  # several tokens per delta
        assert "".join(d.text for d in ds) == be.tokenizer.decode(ids, skip_special_tokens=True)
        assert sum(len(d.logprobs) for d in ds) == 24
    assert all([t for d in ds for t in d.token_ids] == [t for d in runs[0] for t in d.token_ids] for ds in runs)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31), st.floats(0.05, 1.0), st.integers(0, 12), st.floats(0.3, 4.0))
def test_cpu_head_pick_equals_full_sort_pick(rows, seed, p, k, scale):
    g = torch.Generator().manual_seed(seed % 10_007)
    probs = torch.softmax(torch.randn(rows, 300, generator=g) * scale, -1)
    spec = [(1.0, p, k, seed + i, i) for i in range(rows)]
    s = SamplingTensors.build(spec, rows, "cpu")
    u = uniform(s.seeds, s.steps)
    full = filtered_pick(probs, s, u, head=300)  # head = vocabulary: the whole-row sort
    assert filtered_pick(probs, s, u, head=8).tolist() == full.tolist()


def test_bucket_is_coarse_above_32():
    assert [bucket(n) for n in (1, 3, 17, 32, 33, 250, 257, 512, 1025)] == [1, 4, 32, 32, 64, 256, 320, 512, 1152]


def test_padded_layout_does_not_change_when_a_sample_finishes(tiny_llama):
    """Samples of two prompts (4 and 3 live): one class for all shared prompts, so the graph key stays
    the same when one group shrinks from 3 to 2 live branches."""
    _, model = tiny_llama
    cache = KVCache.for_model(model.cfg, num_blocks=256, block_size=8)
    cache.scratch_slot  # noqa: B018 - as the engine does
    keys = []
    for live in ((4, 3), (4, 2)):
        seqs = []
        for n in live:
            base = Sequence.new(cache, [], offset=0)
            model.build_meta(cache, [ForwardItem(base.views, list(range(1, 25)))])
            seqs += base.fork(n)
        meta = model.build_meta(cache, [ForwardItem(s.views, [7]) for s in seqs], pad=True)
        keys.append(meta.shape_key())
        assert sorted(int(c.qidx.shape[1]) for c in meta.classes) == [1, 4]
    assert keys[0] == keys[1]


def test_engine_thread_lowers_the_gil_switch_interval_and_restores_it(tiny_llama):
    import math
    import sys

    _, model = tiny_llama
    outer = sys.getswitchinterval()  # other engines of the session may be running
    sys.setswitchinterval(0.005)
    eng = Engine(model, num_blocks=64, block_size=8)
    try:
        eng.start(switch_interval_s=0.0005)
        assert math.isclose(sys.getswitchinterval(), 0.0005, rel_tol=1e-6)
        eng.stop()
        assert math.isclose(sys.getswitchinterval(), 0.005, rel_tol=1e-6)
    finally:
        eng.stop()
        sys.setswitchinterval(outer)


def test_engine_thread_freezes_startup_objects_and_raises_the_gc_threshold_until_the_last_stop(tiny_llama):
    from ttscale.backends.engine.quiet_gc import QuietGC as _QuietGC

    _, model = tiny_llama
    outer = (_QuietGC.users, _QuietGC.saved)  # engines of other tests may be running: start from none
    _QuietGC.users, _QuietGC.saved = 0, None
    before = gc.get_threshold()
    a, b = Engine(model, num_blocks=64, block_size=8), Engine(model, num_blocks=64, block_size=8)
    try:
        a.start(gc_gen0=before[0] + 12_345)
        b.start(gc_gen0=before[0] + 12_345)
        assert gc.get_threshold() == (before[0] + 12_345, *before[1:])
        assert gc.get_freeze_count() > 0
        a.stop()  # b still runs: the settings stay
        assert gc.get_threshold()[0] == before[0] + 12_345
        b.stop()
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    finally:
        a.stop()
        b.stop()
        gc.set_threshold(*before)
        if outer[0]:
            gc.freeze()
        _QuietGC.users, _QuietGC.saved = outer


async def test_n_samples_of_one_chat_render_and_encode_it_once(tiny_model_dir):
    from ttscale.backends.engine import EngineConfig

    be = EngineBackend(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", num_blocks=256))
    renders = []
    real = be.tokenizer.apply_chat_template

    def counting(*a, **kw):
        renders.append(a)
        return real(*a, **kw)

    be.tokenizer.apply_chat_template = counting
    try:
        msgs = [{"role": "user", "content": "What is 17 * 23?"}]
        first = be.chat_ids(msgs)
        first.append(-1)  # the caller's copy: the memo is not changed through it
        again = be.chat_ids([dict(m) for m in msgs])
        other = be.chat_ids([{"role": "user", "content": "What is 17 * 24?"}])
        assert again == first[:-1] and other != again
        assert len(renders) == 2
        assert again == be.tokenizer.encode(real(msgs, tokenize=False, add_generation_prompt=True),
                                            add_special_tokens=False)
    finally:
        await be.close()


async def test_handoff_gap_grows_with_what_consuming_a_batch_cost_within_bounds():
    inbox = Inbox(asyncio.get_running_loop(), interval_s=0.02, share=0.25)
    inbox._measure(time.monotonic())  # consuming cost ~nothing: the interval
    assert inbox.gap == 0.02
    inbox._measure(time.monotonic() - 0.04)  # 40 ms at a 25% share: at least 160 ms apart
    assert 0.16 <= inbox.gap <= MAX_HANDOFF_GAP_S
    inbox._measure(time.monotonic() - 60.0)  # never further apart than the ceiling
    assert inbox.gap == MAX_HANDOFF_GAP_S


async def test_a_drain_hands_every_output_over_in_order_and_then_measures_itself():
    loop = asyncio.get_running_loop()
    inbox = Inbox(loop, interval_s=0.0, share=1e-6)
    chans = [Channel() for _ in range(3)]
    for k in range(4):
        for i, ch in enumerate(chans):
            inbox.put(ch, RequestOutput(f"r{i}", [k], [-0.5], text=str(k), finished=k == 3))
    outs = [await ch.take() for ch in chans]
    assert [o.token_ids for o in outs] == [[0, 1, 2, 3]] * 3 and all(o.finished for o in outs)
    assert [o.text for o in outs] == ["0123"] * 3
    await asyncio.sleep(0)  # one loop turn: the measurement scheduled after the consumers
    assert inbox.gap > 0.0  # any cost at a share of ~0 spaces the next hand-off


async def test_a_request_the_engine_refuses_fails_when_iterated_and_aborts_nothing(tiny_model_dir):
    from ttscale.backends.engine import EngineConfig
    from ttscale.errors import ConfigError

    be = EngineBackend(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", num_blocks=256))
    try:
        req = GenerationRequest(request_id="bad", messages=[{"role": "user", "content": "hi"}],
                                chat_template_kwargs={"enable_thinking": False})
        stream = be.generate(req)  # nothing is checked or sent before iteration, as on other backends
        try:
            await stream.__anext__()
            raise AssertionError("expected a ConfigError")
        except ConfigError as e:
            assert "chat_template_kwargs" in str(e)
        assert be.engine._commands.empty()  # no add, and no abort for a request never sent
    finally:
        await be.close()
