"""EngineBackend against the Backend protocol on the real bundled SmolLM2 (CPU, fp32)."""

import asyncio

import pytest

from ttscale.backends.base import Backend
from ttscale.errors import ContextOverflow
from ttscale.types import GenerationRequest, SamplingSpec

pytestmark = pytest.mark.slow

Q = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]


async def collect(agen):
    out = []
    async for d in agen:
        out.append(d)
    return out


async def wait_for(cond, timeout=30.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_protocol_and_capabilities(smollm2_backend):
    be = smollm2_backend
    assert isinstance(be, Backend)
    caps = be.capabilities
    assert caps.abort and caps.score and caps.tokenize and caps.token_ids and caps.shared_kv_fork
    assert caps.top_logprobs == 20 and caps.max_context == 8192
    ids = await be.tokenize("Hello world")
    assert be.tokenizer.decode(ids) == "Hello world"


async def test_stream_text_matches_token_ids_and_top_logprobs(smollm2_backend):
    be = smollm2_backend
    ds = await collect(be.generate(GenerationRequest(
        request_id="s1", messages=Q, sampling=SamplingSpec(temperature=0.0, max_tokens=12, logprobs=5))))
    ids = [t for d in ds for t in d.token_ids]
    assert "".join(d.text for d in ds) == be.tokenizer.decode(ids, skip_special_tokens=True)
    assert ds[-1].finish_reason == "length" and len(ids) == 12
    tops = [t for d in ds for t in d.top_logprobs]
    assert len(tops) == 12 and all(len(t) == 5 for t in tops)
    lps = [x for d in ds for x in d.logprobs]
    assert all(abs(max(t.values()) - lp) < 1e-5 for t, lp in zip(tops, lps, strict=True))  # greedy: chosen is the top


async def test_ignore_eos_generates_past_the_end_of_sequence(smollm2_backend):
    be = smollm2_backend
    q = [{"role": "user", "content": "Say hi."}]

    def req(rid: str, ignore_eos: bool) -> GenerationRequest:
        return GenerationRequest(request_id=rid, messages=q,
                                 sampling=SamplingSpec(temperature=0.0, max_tokens=80, ignore_eos=ignore_eos))

    ended = await collect(be.generate(req("eos-1", False)))
    kept = await collect(be.generate(req("eos-2", True)))
    ended_ids = [t for d in ended for t in d.token_ids]
    kept_ids = [t for d in kept for t in d.token_ids]
    assert ended[-1].finish_reason == "stop" and len(ended_ids) < 80  # the model ends its short answer
    assert kept[-1].finish_reason == "length" and len(kept_ids) == 80
    assert kept_ids[:len(ended_ids)] == ended_ids  # greedy: the same answer, then past its end


async def test_stop_string_cuts_text(smollm2_backend):
    be = smollm2_backend
    ds = await collect(be.generate(GenerationRequest(
        request_id="s2", messages=Q, sampling=SamplingSpec(temperature=0.0, max_tokens=60, stop=["5"]))))
    text = "".join(d.text for d in ds)
    assert ds[-1].finish_reason == "stop"
    assert "5" not in text and "4" in text


async def test_cancelling_the_consumer_aborts_and_frees_blocks(smollm2_backend):
    be = smollm2_backend
    eng = be.engine
    base = eng.cache.pool.num_used
    agen = be.generate(GenerationRequest(request_id="c1", messages=Q,
                                         sampling=SamplingSpec(temperature=1.0, max_tokens=2000)))
    n = 0
    async for d in agen:
        n += len(d.token_ids)
        if n >= 3:
            break
    await agen.aclose()
    await wait_for(lambda: "c1" not in eng.requests)
    held = eng.prefix.held_blocks()
    await wait_for(lambda: eng.cache.pool.num_used <= max(base, 1 + len(held)))


async def test_fork_streams_children(smollm2_backend):
    be = smollm2_backend
    agen = be.generate(GenerationRequest(request_id="f1", messages=Q,
                                         sampling=SamplingSpec(temperature=0.0, max_tokens=20)))
    parent, forked = [], None
    async for d in agen:
        parent += d.token_ids
        if forked is None and len(parent) >= 4:
            forked = be.fork("f1", 2)
    kids = await asyncio.gather(*(collect(s) for _, s in forked))
    for ds in kids:
        got = [t for d in ds for t in d.token_ids]
        assert ds[-1].finished
        # greedy: a child continues exactly as its parent did from the fork point
        assert got and parent[-len(got):] == got and len(parent) - len(got) >= 4


async def test_context_overflow_is_a_clear_error(smollm2_backend):
    with pytest.raises(ContextOverflow, match="exceeds"):
        await collect(smollm2_backend.generate(GenerationRequest(
            request_id="o1", prompt_token_ids=[1] * 8000, sampling=SamplingSpec(max_tokens=500))))


def test_top_logprob_texts_keeps_every_candidate_when_texts_collide():
    """Byte pieces of multi-byte characters all decode to U+FFFD: keyed by text alone, a top-20 list kept
    a handful of candidates (seen in the study's banks as 'top-3'); every candidate must keep its entry."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from transformers import AutoTokenizer

    from ttscale.backends.engine.backend import top_logprob_texts
    from ttscale.models import default_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    colliding = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"][:20]
    assert len(colliding) >= 2
    out = top_logprob_texts(tok, {t: -float(j) for j, t in enumerate(colliding)})
    assert len(out) == len(colliding)
    assert sorted(out.values()) == sorted(-float(j) for j in range(len(colliding)))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.sampled_from(colliding + list(range(200, 400))), min_size=1, max_size=20, unique=True))
    def one_key_per_candidate(ids):
        assert len(top_logprob_texts(tok, {t: -0.5 for t in ids})) == len(ids)

    one_key_per_candidate()
