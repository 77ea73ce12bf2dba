"""What every strategy is: a pydantic config plus `async run(problem, ctx) -> Result`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import Field, ValidationError

from ttscale.answers import extract_answer
from ttscale.backends.base import Backend
from ttscale.controller import Context
from ttscale.errors import CapabilityError, ConfigError
from ttscale.prompts import system_prompt_for
from ttscale.types import Branch, BranchStatus, Problem, Result, SamplingSpec, StrictModel, Trace


class StrategyConfig(StrictModel):
    """Sampling knobs every strategy has. Defaults follow the FFS/DeepSeek-R1 evaluation setting."""

    temperature: float = Field(0.6, ge=0.0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_tokens: int = Field(2048, ge=1, description="per-branch generation limit")
    system_prompt: str | None = Field(None, description="default: a step-by-step prompt for the problem kind")
    seed: int | None = Field(None, description="base seed; branch i uses seed + i")

    def sampling(self, **overrides: Any) -> SamplingSpec:
        base = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "seed": self.seed}
        base.update(overrides)
        return SamplingSpec(**base)


class Strategy(ABC):
    """A test-time-compute algorithm over the Context API.

    Subclasses set `name`, `Config`, and `needs` (capabilities checked before start), and implement `run`.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    needs: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    # Config fields whose value names a server-side resource (a backend spec, a judge that loads a file),
    # mapped to the constructor keyword that takes the built object. A server resolves such fields from
    # names its operator chose instead of letting a request name them (ttscale/server/resources.py).
    resource_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, config: StrategyConfig | dict[str, Any] | None = None, **kwargs: Any):
        if isinstance(config, StrategyConfig):
            if kwargs:
                config = config.model_copy(update=kwargs)
            self.config = config
        else:
            try:
                self.config = self.Config(**{**(config or {}), **kwargs})
            except ValidationError as exc:
                raise ConfigError(f"invalid config for strategy {self.name!r}: {_pydantic_message(exc)}") from exc

    @property
    def spec(self) -> str:
        """The spec string that recreates this strategy (`name:field=value,...` with non-default fields)."""
        changed = self.config.model_dump(exclude_defaults=True)
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(changed.items()))

    def check(self, backend: Backend) -> None:
        """Fail before starting when the backend lacks a capability this strategy needs."""
        missing = backend.capabilities.missing(*self.needs)
        if missing:
            raise CapabilityError(
                f"strategy {self.name!r} needs backend capabilities {missing} that {backend.name!r} lacks"
                + (f" ({self.needs_why})" if getattr(self, "needs_why", "") else "")
            )

    @abstractmethod
    async def run(self, problem: Problem, ctx: Context) -> Result:
        """Solve one problem using `ctx` and return the Result (the caller grades it)."""

    # ---------------------------------------------------------------- fan-out bounds (pure, from the config)

    @classmethod
    def max_branches(cls, config: Any) -> int:
        """Most generations and scoring calls one run may start (`n`, or 1 without an `n`). A server checks
        it before starting anything; strategies whose fan-out is not `n` override it."""
        return int(getattr(config, "n", 1))

    @classmethod
    def max_tokens_bound(cls, config: Any) -> int | None:
        """Most tokens one run may generate (every generation at its `max_tokens`); None = no bound known."""
        return cls.max_branches(config) * int(config.max_tokens)

    # ---------------------------------------------------------------- helpers for subclasses

    def messages(self, problem: Problem) -> list[dict[str, Any]]:
        """The problem as chat messages, with the config's (or the kind's default) system prompt."""
        return problem.chat(self.config.system_prompt or system_prompt_for(problem.kind))

    @staticmethod
    def answer_of(branch: Branch | Trace, problem: Problem) -> str | None:
        return extract_answer(branch.text, problem.kind, problem.choices)

    def trace(self, branch: Branch, problem: Problem, score: float | None = None) -> Trace:
        answer = self.answer_of(branch, problem) if branch.status is BranchStatus.finished else None
        return Trace.from_branch(branch, answer=answer, score=score)

    def result(self, problem: Problem, ctx: Context, *, answer: str | None, traces: list[Trace],
               decision: dict[str, Any] | None = None, text: str | None = None,
               fallbacks: list[str] | None = None) -> Result:
        decision = dict(decision or {})
        if ctx.log:
            decision.setdefault("log", list(ctx.log))
        if ctx.budget_hit:
            decision.setdefault("budget_hit", ctx.budget_hit)
        return Result(problem_id=problem.id, answer=answer, text=text, traces=traces, decision=decision,
                      usage=ctx.usage, strategy=self.name, config=self.config.model_dump(),
                      fallbacks=list(fallbacks or []))


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        parts.append(f"{loc}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and e['type'] != 'missing' else ""))
    return "; ".join(parts)
