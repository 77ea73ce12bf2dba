"""Pydantic models shared by every layer.

The vocabulary follows DESIGN.md: a Problem is asked, Branches are live generations, a Trace is the
frozen record of a branch, Usage counts what was spent and a Result is what a strategy returns.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for configs: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Problem(StrictModel):
    """One question. Either `prompt` (plain text, sent as a user message) or `messages` (chat)."""

    id: str = "problem"
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    answer: str | None = None
    kind: Literal["math", "choice", "free"] = "math"
    choices: list[str] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_input(self) -> Problem:
        if self.prompt is None and not self.messages:
            raise ValueError("a Problem needs `prompt` or `messages`")
        if self.kind == "choice" and not self.choices:
            raise ValueError("a Problem of kind 'choice' needs `choices`")
        return self

    def chat(self, system: str | None = None) -> list[dict[str, Any]]:
        """The problem as chat messages (a system prompt is prepended when given and absent)."""
        msgs = [dict(m) for m in self.messages] if self.messages else [{"role": "user", "content": self.prompt}]
        if system and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs


DEFAULT_MAX_TOKENS = 2048
"""The one default per-branch generation limit (`SamplingSpec.max_tokens`, `StrategyConfig.max_tokens`).

2048: strategy configs have always defaulted to it, so the config hashes that key stored eval results
(resume, reports) stay what they were; sampling specs and the engine used to default to 1024 and 256."""


class SamplingSpec(StrictModel):
    """How one branch samples: the one sampling-parameter type of the public API and of our engine (which
    also exports it as `SamplingParams`). `top_k=0` and `top_p=1.0` mean off; `logprobs=k` asks for top-k
    logprobs."""

    temperature: float = Field(0.6, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: int | None = Field(None, ge=0, le=20)
    include_stop_str: bool = False
    ignore_eos: bool = Field(False,
                             description="generate to max_tokens past end-of-sequence (load and throughput runs)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="1.0 = off (vLLM's multiplicative penalty)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="0 = off")
    min_tokens: int = Field(0, ge=0, description="tokens generated before end-of-sequence or stop may end it")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> bias added to its logit")
    detokenize: bool = Field(True, description="return text with the tokens (False: token ids only, no "
                             "stop strings; throughput runs); honoured by the engine backend")

    def penalties_set(self) -> list[str]:
        """The fields beyond temperature / top-p / top-k / stop / seed / logprobs this spec sets (a backend
        that cannot apply them names them in its error)."""
        return [name for name, off in _PENALTIES_OFF.items() if getattr(self, name) != off]


# The fields `penalties_set` looks at and their defaults (off), read once: pydantic's `get_default` inspects the
# default factory's signature at each call (~10 us), and every request is checked two or three times.
_PENALTIES_OFF = {name: SamplingSpec.model_fields[name].get_default(call_default_factory=True)
                  for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                               "logit_bias")}


class GenerationRequest(StrictModel):
    """What a backend is asked to generate: one branch.

    Exactly one of `prompt` (raw text, no chat template), `messages` (chat) or `prompt_token_ids`.
    `continue_final_message` continues the last (assistant) message instead of opening a new turn.
    """

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    continue_final_message: bool = False
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    parent_id: str | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra arguments of the chat template (`enable_thinking`, ...); chat requests only")

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids))
        if given != 1:
            raise ValueError("a GenerationRequest needs exactly one of prompt, messages, prompt_token_ids")
        return self


class Delta(BaseModel):
    """A piece of one branch's output as the backend streams it.

    `logprobs[i]` is the logprob of `token_ids[i]`; `top_logprobs[i]` maps candidate token (string) to logprob.
    The last delta of a request has `finished=True` and a `finish_reason` (stop | length | abort | error).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    num_tokens: int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None
    tokens: list[str] | None = Field(None, description="the sampled tokens as text, one per logprob, when the "
                                     "backend sends them (an OpenAI-compatible server's logprobs)")
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    error: str | None = None
    # True: `num_tokens` is estimated from the text (the server sent no counts); False: this Delta makes
    # the branch's count exact again (it carries the correction from the server's final usage).
    estimated_tokens: bool | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens carried by this delta (token ids when known, else the backend's count)."""
        if self.num_tokens is not None:
            return self.num_tokens
        return len(self.token_ids)


class ScoreRequest(StrictModel):
    """Log-likelihood of `continuation` given a context, for verifiers and ATTS."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    continue_final_message: bool = False
    continuation: str | None = None
    continuation_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _inputs(self) -> ScoreRequest:
        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)) != 1:
            raise ValueError("a ScoreRequest needs exactly one of prompt, messages, prompt_token_ids")
        if (self.continuation is None) == (self.continuation_token_ids is None):
            raise ValueError("a ScoreRequest needs exactly one of continuation, continuation_token_ids")
        return self


class ScoreResult(BaseModel):
    token_ids: list[int]
    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        return float(sum(self.logprobs) / max(1, len(self.logprobs)))


class BranchStatus(StrEnum):
    running = "running"
    finished = "finished"
    aborted = "aborted"
    failed = "failed"


class Branch(BaseModel):
    """One live generation, updated by the Context as deltas arrive."""

    id: str
    parent: str | None = None
    group: str | None = None
    request: GenerationRequest | None = None
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    token_times: list[float] = Field(default_factory=list)
    status: BranchStatus = BranchStatus.running
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    seq_base: int = 0
    seq_prompt_base: int = 0
    created_at: float = Field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_order: int | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status is not BranchStatus.running

    @property
    def seq_end(self) -> int:
        """Sequential tokens on the critical path up to the end of this branch."""
        return self.seq_base + self.num_tokens

    @property
    def seq_prompt_end(self) -> int:
        """Prompt tokens read by the calls on the critical path up to this branch, its own prompt included."""
        return self.seq_prompt_base + self.prompt_tokens


SUMMARY_ROLE = "summary"
"""`Trace.meta["role"]` of a trace written over other traces (ParaThinker's summary): not one more sample of
the model's answers, so maj@k and pass@k leave it out (`Trace.is_sample`)."""


class Trace(BaseModel):
    """Frozen record of a branch, with its extracted answer."""

    id: str
    parent: str | None = None
    text: str
    token_ids: list[int] = Field(default_factory=list)
    num_tokens: int
    logprobs: list[float] = Field(default_factory=list)
    token_times: list[float] = Field(default_factory=list)
    status: BranchStatus
    finish_reason: str | None = None
    finish_order: int | None = None
    answer: str | None = None
    score: float | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_branch(cls, b: Branch, answer: str | None = None, score: float | None = None) -> Trace:
        return cls(
            id=b.id, parent=b.parent, text=b.text, token_ids=list(b.token_ids), num_tokens=b.num_tokens,
            logprobs=list(b.logprobs), token_times=list(b.token_times), status=b.status,
            finish_reason=b.finish_reason, finish_order=b.finish_order, answer=answer, score=score,
            meta=dict(b.meta),
        )

    @property
    def is_sample(self) -> bool:
        """Whether this trace is one sample of the model's answers (what maj@k and pass@k count)."""
        return self.meta.get("role") != SUMMARY_ROLE


class ModelUsage(BaseModel):
    """What one model (a backend label in a Context tree) spent: the counts of `Usage` that add up."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    calls: int = 0
    score_calls: int = 0
    scored_tokens: int = 0
    branches: int = 0

    def __add__(self, other: ModelUsage) -> ModelUsage:
        return ModelUsage(**{k: getattr(self, k) + getattr(other, k) for k in ModelUsage.model_fields})


def add_by_model(a: dict[str, ModelUsage], b: dict[str, ModelUsage]) -> dict[str, ModelUsage]:
    """Per-model counts of two Usages, summed label by label."""
    out = dict(a)
    for label, u in b.items():
        out[label] = out[label] + u if label in out else u
    return out


class Usage(BaseModel):
    """What a run spent.

    `sequential_tokens` is the critical path: generated tokens along the longest chain of branches where
    each depends on the ones before it (what latency is made of). `saved_tokens` is an *estimate* of the
    tokens aborted branches would still have generated (each as long as the median finished branch of
    its run, `ttscale.accounting`); `unspent_token_cap` is exact but only a ceiling: the sum of
    `max_tokens - generated` over aborted branches. The measured saving is against a baseline run
    (`ttscale report`). `by_model` splits the counts that
    add up per model (the label of each Context in a tree: a draft and a target model cost very
    different amounts, so they are never only summed into `generated_tokens`).
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    sequential_tokens: int = 0
    sequential_prompt_tokens: int = 0
    saved_tokens: int = Field(0, description="estimate: tokens aborted branches would still have generated")
    unspent_token_cap: int = Field(0, description="sum of max_tokens - generated over aborted branches")
    wall_time_s: float = 0.0
    recorded_wall_time_s: float | None = Field(
        None, description="replays only: the time on the replayed traces' recorded timeline (wall_time_s is "
                          "then the replay's own CPU-side time)")
    peak_kv_blocks: int | None = None
    calls: int = 0
    score_calls: int = 0
    scored_tokens: int = 0
    branches: int = 0
    aborted: int = 0
    by_model: dict[str, ModelUsage] = Field(default_factory=dict)

    def __add__(self, other: Usage) -> Usage:
        """The one summing rule: counts and wall time add, per-model counts add label by label, the KV
        peak is the larger. (`Context.usage` folds its `add_usage` extras and child Contexts with it;
        only the critical path of branches in one Context tree is read off their dependency graph.)"""
        peak = [x for x in (self.peak_kv_blocks, other.peak_kv_blocks) if x is not None]
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens + other.cached_prompt_tokens,
            generated_tokens=self.generated_tokens + other.generated_tokens,
            sequential_tokens=self.sequential_tokens + other.sequential_tokens,
            sequential_prompt_tokens=self.sequential_prompt_tokens + other.sequential_prompt_tokens,
            saved_tokens=self.saved_tokens + other.saved_tokens,
            unspent_token_cap=self.unspent_token_cap + other.unspent_token_cap,
            wall_time_s=self.wall_time_s + other.wall_time_s,
            recorded_wall_time_s=(None if self.recorded_wall_time_s is None and other.recorded_wall_time_s is None
                                  else (self.recorded_wall_time_s or 0.0) + (other.recorded_wall_time_s or 0.0)),
            peak_kv_blocks=max(peak) if peak else None,
            calls=self.calls + other.calls,
            score_calls=self.score_calls + other.score_calls,
            scored_tokens=self.scored_tokens + other.scored_tokens,
            branches=self.branches + other.branches,
            aborted=self.aborted + other.aborted,
            by_model=add_by_model(self.by_model, other.by_model),
        )


class Result(BaseModel):
    """What a strategy returns: the answer, the traces, the record of how it was chosen, and the cost."""

    problem_id: str
    answer: str | None
    text: str | None = None
    traces: list[Trace] = Field(default_factory=list)
    decision: dict[str, Any] = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)
    strategy: str
    config: dict[str, Any] = Field(default_factory=dict)
    fallbacks: list[str] = Field(default_factory=list)
    correct: bool | None = None
    # Set when the problem could not be solved at all (every branch failed, or the backend raised): the
    # reason. `answer` is then None and is not a wrong answer: evals store the problem as an error.
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


EventKind = Literal["spawned", "delta", "finished", "aborted", "failed", "budget", "decision", "log"]


class Event(BaseModel):
    """Something observable that happened in a Context (progress bars, streaming and dumps use these)."""

    kind: EventKind
    branch_id: str | None = None
    text: str = ""
    n_tokens: int = 0
    data: dict[str, Any] = Field(default_factory=dict)
    t: float = Field(default_factory=time.monotonic)
