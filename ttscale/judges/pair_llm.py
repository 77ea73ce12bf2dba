"""The LLM pair judge: asks a Backend whether two prefixes lead to the same answer and reads P(yes)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from ttscale.errors import ConfigError
from ttscale.judges.pair_base import JudgeBase
from ttscale.types import GenerationRequest, SamplingSpec, Usage

LLM_JUDGE_PROMPT = (
    "Two solutions to the same problem were started. Here are their beginnings.\n\n"
    "Solution A:\n{a}\n\nSolution B:\n{b}\n\n"
    "Will these two solutions reach the same final answer? Answer with yes or no."
)


def p_yes(top_logprobs: dict[str, float]) -> float | None:
    """P(yes) renormalised over the yes/no candidates among the top logprobs; None when neither is there."""
    yes = [lp for t, lp in top_logprobs.items() if t.strip().lower() == "yes"]
    no = [lp for t, lp in top_logprobs.items() if t.strip().lower() == "no"]
    if not yes and not no:
        return None
    ly = np.logaddexp.reduce(yes) if yes else -math.inf
    ln = np.logaddexp.reduce(no) if no else -math.inf
    return float(1.0 / (1.0 + math.exp(ln - ly))) if ly > -math.inf else 0.0


class LLMJudge(JudgeBase):
    """Zero-shot judge through any Backend with top logprobs; its own spend is kept in `usage`."""

    name = "llm"

    def __init__(self, backend: Any, top_logprobs: int = 20, prompt: str = LLM_JUDGE_PROMPT):
        if backend.capabilities.top_logprobs < 1:
            raise ConfigError(f"the LLM judge needs top logprobs from {backend.name!r} to read P(yes)")
        self.backend = backend
        self.top_logprobs = min(top_logprobs, backend.capabilities.top_logprobs)
        self.prompt = prompt
        self.usage = Usage()
        self.undecided = 0
        self._ids = 0

    async def ap_same(self, prefix_a: str, prefix_b: str) -> float:
        self._ids += 1
        req = GenerationRequest(
            request_id=f"judge-{id(self):x}-{self._ids}",
            messages=[{"role": "user", "content": self.prompt.format(a=prefix_a, b=prefix_b)}],
            sampling=SamplingSpec(temperature=0.0, top_p=1.0, max_tokens=1, logprobs=self.top_logprobs),
        )
        tops: dict[str, float] = {}
        prompt_tokens = generated = 0
        async for d in self.backend.generate(req):
            prompt_tokens = d.prompt_tokens or prompt_tokens
            generated += d.n_tokens
            if d.top_logprobs and not tops:
                tops = d.top_logprobs[0]
        self.usage = self.usage + Usage(prompt_tokens=prompt_tokens, generated_tokens=generated, calls=1)
        p = p_yes(tops)
        if p is None:
            self.undecided += 1
            return 0.5
        return p

    def p_same(self, prefix_a: str, prefix_b: str) -> float:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ap_same(prefix_a, prefix_b))
        raise RuntimeError("LLMJudge.p_same called inside an event loop; await ap_same instead")

