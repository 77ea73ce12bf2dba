"""What every strategy is: a pydantic config plus `async run(problem, ctx) -> Result`."""

from __future__ import annotations

import copy
import difflib
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Self, TypeVar, cast

from pydantic import Field, ValidationError, field_validator

from ttscale.answers import extract_answer
from ttscale.backends.base import Backend
from ttscale.controller import Context
from ttscale.errors import CapabilityError, ConfigError
from ttscale.prompts import DEFAULT_SYSTEM_PROMPT, resolve_system_prompt
from ttscale.specs import Spec, format_spec
from ttscale.types import (
    DEFAULT_MAX_TOKENS,
    Branch,
    BranchStatus,
    Problem,
    Result,
    SamplingSpec,
    StrictModel,
    Trace,
)


class StrategyConfig(StrictModel):
    """Sampling knobs every strategy has. Defaults follow the FFS/DeepSeek-R1 evaluation setting."""

    temperature: float = Field(0.6, ge=0.0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, description="per-branch generation limit")
    system_prompt: str | None = Field(
        DEFAULT_SYSTEM_PROMPT,
        description='"default": the dataset\'s or problem kind\'s step-by-step prompt; None: no system prompt; '
                    'other text: that prompt')
    seed: int | None = Field(None, description="base seed; branch i uses seed + i")

    @field_validator("system_prompt")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        """An empty (or blank) prompt sends none, as None does: one config, one run key, not two."""
        return None if v is not None and not v.strip() else v

    # The config field that `NAME-N` (and the proxy's `NAME-N/MODEL`) sets: how many branches run side by
    # side. A config that declares none inherits its parent's, else has `n` when it has that field; None:
    # the strategy has no width.
    width_field: ClassVar[str | None] = None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        declared = "width_field" in cls.__dict__
        if declared and cls.width_field is not None and cls.width_field not in cls.model_fields:
            raise TypeError(f"{cls.__name__}.width_field is {cls.width_field!r}, which is not one of its fields")
        if not declared and cls.width_field not in cls.model_fields:
            cls.width_field = "n" if "n" in cls.model_fields else None

    @classmethod
    def width_values(cls, width: int) -> dict[str, Any] | None:
        """The config values `NAME-width` stands for; None when this strategy has no width."""
        return None if cls.width_field is None else {cls.width_field: width}

    def sampling(self, **overrides: Any) -> SamplingSpec:
        base: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "seed": self.seed}
        base.update(overrides)
        return SamplingSpec(**base)


C = TypeVar("C", bound=StrategyConfig)


class Strategy(ABC, Generic[C]):
    """A test-time-compute algorithm over the Context API.

    Subclasses set `name`, `Config`, and `needs` (capabilities checked before start), and implement `run`.
    A subclass declares its config type as `Strategy[ItsConfig]` (with `Config = ItsConfig`), so
    `self.config` has that type.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    needs: ClassVar[tuple[str, ...]] = ()
    needs_why: ClassVar[str] = ""  # what to do when `needs` are missing (shown in the error)
    paper: ClassVar[str] = ""
    # Config fields whose value names a server-side resource (a backend spec, a judge that loads a file),
    # mapped to the constructor keyword that takes the built object. A server resolves such fields from
    # names its operator chose instead of letting a request name them (ttscale/server/resources.py).
    resource_fields: ClassVar[dict[str, str]] = {}
    config: C

    def __init__(self, config: StrategyConfig | dict[str, Any] | None = None, **kwargs: Any):
        if isinstance(config, StrategyConfig):
            if kwargs:
                config = config.model_copy(update=kwargs)
            self.config = cast(C, config)
        else:
            try:
                self.config = cast(C, self.Config(**{**(config or {}), **kwargs}))
            except ValidationError as exc:
                raise ConfigError(f"invalid config for strategy {self.name!r}: "
                                  f"{_pydantic_message(exc, list(self.Config.model_fields))}") from exc

    @property
    def spec(self) -> str:
        """The spec string that recreates this strategy (`name:field=value,...` with its non-default fields,
        sorted, quoted where needed): `make_strategy(s.spec)` has `s`'s class and config."""
        changed = self.config.model_dump(exclude_defaults=True)
        return format_spec(Spec(name=self.name, options=dict(sorted(changed.items()))), also_quote="/")

    def eval_note(self) -> str | None:
        """A line the eval CLI prints after a run (DeepPrune: its judge's measured AUROC); None: nothing."""
        return None

    def check(self, backend: Backend) -> None:
        """Fail before starting when the backend lacks a capability this strategy needs."""
        missing = backend.capabilities.missing(*self.needs)
        if missing:
            raise CapabilityError(
                f"strategy {self.name!r} needs backend capabilities {missing} that {backend.name!r} lacks"
                + (f" ({self.needs_why})" if self.needs_why else "")
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

    def system_prompt(self, problem: Problem) -> str | None:
        """The system message this strategy sends for `problem` (None: none); see `ttscale.prompts`."""
        return resolve_system_prompt(self.config.system_prompt, problem.kind)

    def with_system_prompt(self, choice: str | None) -> Self:
        """A copy of this strategy (sharing its judges and other parts) whose `system_prompt` is `choice`."""
        twin = copy.copy(self)
        twin.config = self.config.model_copy(update={"system_prompt": StrategyConfig._blank_is_none(choice)})
        return twin

    def messages(self, problem: Problem) -> list[dict[str, Any]]:
        """The problem as chat messages, with the system prompt of `system_prompt(problem)` when there is one."""
        return problem.chat(self.system_prompt(problem))

    @staticmethod
    def answer_of(branch: Branch | Trace, problem: Problem) -> str | None:
        """The answer `branch` commits to; one cut at `max_tokens` gets none from where its text happens to end."""
        return extract_answer(branch.text, problem.kind, problem.choices,
                              truncated=branch.finish_reason == "length")

    def trace(self, branch: Branch, problem: Problem, score: float | None = None) -> Trace:
        answer = self.answer_of(branch, problem) if branch.status is BranchStatus.finished else None
        return Trace.from_branch(branch, answer=answer, score=score)

    def result(self, problem: Problem, ctx: Context, *, answer: str | None, traces: list[Trace],
               decision: dict[str, Any] | None = None, text: str | None = None,
               fallbacks: list[str] | None = None) -> Result:
        """The Result of a run. With no answer after a budget ran out, `fallbacks` says so (`budget_note`):
        without it an empty answer reads like a model that said nothing."""
        decision = dict(decision or {})
        fallbacks = list(fallbacks or [])
        if ctx.log:
            decision.setdefault("log", list(ctx.log))
        if ctx.budget_hit:
            decision.setdefault("budget_hit", ctx.budget_hit)
            if answer is None:
                fallbacks.append(budget_note(ctx.budget_hit))
        return Result(problem_id=problem.id, answer=answer, text=text, traces=traces, decision=decision,
                      usage=ctx.usage, strategy=self.name, config=self.config.model_dump(),
                      fallbacks=fallbacks)


def budget_note(budget: str) -> str:
    """The `Result.fallbacks` entry of a run that has no answer because its `budget` ran out."""
    return f"no answer: the {budget} budget ran out before any branch gave one"


def out_of_budget(result: Result) -> bool:
    """Whether `result` has no answer because a budget ran out (not a failure: a rerun spends the same)."""
    return result.answer is None and result.error is None and bool(result.decision.get("budget_hit"))


def _pydantic_message(exc: ValidationError, fields: list[str] | None = None) -> str:
    """One line per error; an unknown field gets the closest known names (`nn` -> did you mean 'n'?)."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        text = f"{loc}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and e['type'] != 'missing' else "")
        if e["type"] == "extra_forbidden" and fields:
            close = difflib.get_close_matches(str(e["loc"][-1]), fields, n=3, cutoff=0.6)
            text += f"; did you mean {' or '.join(map(repr, close))}?" if close else f"; fields: {', '.join(fields)}"
        parts.append(text)
    return "; ".join(parts)
