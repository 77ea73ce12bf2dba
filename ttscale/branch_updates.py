"""Branch handles for the Context: the request a new branch sends (a spawn, a re-prefilled fork) and how
a backend's Deltas fold into its Branch."""

from __future__ import annotations

from enum import Enum
from typing import Any

from ttscale.types import Branch, Delta, GenerationRequest, Problem, SamplingSpec

# What a branch can be spawned from: a Problem, a question, chat messages, or a ready request.
Source = Problem | str | list[dict[str, Any]] | GenerationRequest


class After(Enum):
    """`Context.spawn`'s default `after`: every branch already finished when it is spawned."""

    ALL_FINISHED = "all finished"


def request_for(source: Source, rid: str, sampling: SamplingSpec, continue_final: bool,
                system_prompt: str | None) -> GenerationRequest:
    """The backend request of a new branch of `source` (a Problem or a question is put in chat form under
    `system_prompt`; messages are sent as they are)."""
    if isinstance(source, GenerationRequest):
        return source.model_copy(update={"request_id": rid, "sampling": sampling})
    if isinstance(source, Problem):
        return GenerationRequest(request_id=rid, messages=source.chat(system_prompt), sampling=sampling)
    if isinstance(source, str):
        return GenerationRequest(
            request_id=rid,
            messages=Problem(prompt=source).chat(system_prompt),
            sampling=sampling,
        )
    if isinstance(source, list):
        return GenerationRequest(
            request_id=rid, messages=source, sampling=sampling, continue_final_message=continue_final
        )
    raise TypeError(f"cannot build a request from {type(source).__name__}")


def seed_for(sampling: SamplingSpec, index: int, serial: int, run_seed: int | None) -> int | None:
    """The seed of the `index`-th branch of one spawn: the sampling's own seed plus `index`, else one
    derived from the run's seed and the branch's serial number, else None."""
    if sampling.seed is not None:
        return sampling.seed + index
    if run_seed is None:
        return None
    return (run_seed * 1_000_003 + serial) % (2**31 - 1)


def continuation_request(req: GenerationRequest, branch: Branch, rid: str, sampling: SamplingSpec
                         ) -> GenerationRequest:
    """A request that continues `branch` from its text so far as the same assistant turn (a fork where
    the backend cannot share KV: prefix caching keeps the re-prefill cheap)."""
    if req.messages is not None:
        msgs = [dict(m) for m in req.messages]
        if req.continue_final_message and msgs and msgs[-1].get("role") == "assistant":
            msgs[-1]["content"] = str(msgs[-1].get("content", "")) + branch.text
        else:
            msgs.append({"role": "assistant", "content": branch.text})
        return GenerationRequest(request_id=rid, messages=msgs, continue_final_message=True, sampling=sampling)
    if req.prompt is not None:
        return GenerationRequest(request_id=rid, prompt=req.prompt + branch.text, sampling=sampling)
    return GenerationRequest(request_id=rid, prompt_token_ids=list(req.prompt_token_ids or []) + list(branch.token_ids),
                             sampling=sampling)


def apply_delta(branch: Branch, delta: Delta, now: float) -> int:
    """Fold one backend Delta into `branch` (text, tokens, logprobs, token times, prompt counts); returns
    the tokens it adds (negative when an estimate is corrected downwards)."""
    n = delta.n_tokens
    # Backends repeat the prompt counts on every delta; a model field assignment costs ~1 us.
    if delta.prompt_tokens is not None and delta.prompt_tokens != branch.prompt_tokens:
        branch.prompt_tokens = delta.prompt_tokens
    if delta.cached_prompt_tokens is not None and delta.cached_prompt_tokens != branch.cached_prompt_tokens:
        branch.cached_prompt_tokens = delta.cached_prompt_tokens
    if delta.estimated_tokens is not None:
        branch.meta["estimated_tokens"] = delta.estimated_tokens
    if n or delta.text:
        if branch.first_token_at is None:
            branch.first_token_at = now
        branch.text += delta.text
        if delta.token_ids:
            branch.token_ids.extend(delta.token_ids)
        branch.num_tokens += n
        if delta.logprobs:
            branch.logprobs.extend(delta.logprobs)
        if delta.top_logprobs:
            branch.top_logprobs.extend(delta.top_logprobs)
        if n > 0:
            branch.token_times.extend([now] * n)
        elif n < 0:  # an estimated count corrected downwards by the server's final usage
            del branch.token_times[n:]
    return n
