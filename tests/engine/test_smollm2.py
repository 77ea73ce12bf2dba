"""Acceptance 4: the bundled SmolLM2-135M-Instruct loads, answers coherently, logprobs match transformers."""

import pytest
import torch

from ttscale.types import GenerationRequest, SamplingSpec, ScoreRequest

pytestmark = pytest.mark.slow


async def test_chat_answer_is_coherent(smollm2_backend):
    req = GenerationRequest(
        request_id="paris", messages=[{"role": "user", "content": "What is the capital of France?"}],
        sampling=SamplingSpec(temperature=0.0, max_tokens=40),
    )
    text, last = "", None
    async for d in smollm2_backend.generate(req):
        text += d.text
        last = d
    assert "Paris" in text
    assert last.finished and last.finish_reason == "stop"


async def test_logprobs_match_transformers_fp32(smollm2_backend, smollm2_dir):
    from transformers import AutoModelForCausalLM

    be = smollm2_backend
    msgs = [{"role": "user", "content": "Name three primary colours."}]
    req = GenerationRequest(request_id="lp", messages=msgs, sampling=SamplingSpec(temperature=0.0, max_tokens=24))
    ids, lps = [], []
    async for d in be.generate(req):
        ids += d.token_ids
        lps += d.logprobs or []
    prompt = be.chat_ids(msgs)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    assert len(ids) > 5
    assert ids == logits.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(lps), ref, atol=1e-3)
    # score() is a prefill over the same tokens: same logprobs
    sc = await be.score(ScoreRequest(prompt_token_ids=prompt, continuation_token_ids=ids))
    assert torch.allclose(torch.tensor(sc.logprobs), ref, atol=1e-3)
