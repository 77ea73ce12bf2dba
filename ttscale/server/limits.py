"""Fan-out limits of the proxy: how many upstream calls and tokens one request may start, before it starts.

A strategy request's bound comes from its config (`Strategy.max_branches` / `max_tokens_bound`, pure
class methods), a pass-through request's from its prompt list, `n`, `best_of` and `max_tokens`. Pure
functions: the server turns an `Exceeded` into a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ttscale.strategies.base import Strategy, StrategyConfig


@dataclass(frozen=True)
class Exceeded:
    """A limit a request would pass: which field to blame and the message that says why."""

    param: str | None
    message: str


def _bounds(cls: type[Strategy], config: StrategyConfig) -> tuple[int, int | None]:
    return cls.max_branches(config), cls.max_tokens_bound(config)


def _culprit(
    cls: type[Strategy], raw: dict[str, Any], params: dict[str, str], which: int, current: int
) -> str | None:
    """The request field whose removal lowers the bound most (`which`: 0 branches, 1 tokens)."""
    best: tuple[int, str] | None = None
    for field, param in params.items():
        if field not in raw:
            continue
        try:
            lowered = _bounds(cls, cls.Config(**{k: v for k, v in raw.items() if k != field}))[which]
        except ValidationError:
            continue
        if lowered is not None and lowered < current and (best is None or lowered < best[0]):
            best = (lowered, param)
    return best[1] if best else None


def check_strategy(
    cls: type[Strategy],
    config: StrategyConfig,
    raw: dict[str, Any],
    params: dict[str, str],
    default_param: str,
    *,
    max_branches: int,
    max_total_tokens: int,
) -> Exceeded | None:
    """Compare a strategy config's fan-out with the server's limits.

    `raw` is the config as the request gave it (before validation), `params` maps each of its fields to
    the request field it came from (`ttscale.k`, `model`, `max_tokens`), `default_param` is blamed when no
    single field is to blame (the strategy's own defaults are over the limit)."""
    branches, tokens = _bounds(cls, config)
    if branches > max_branches:
        param = _culprit(cls, raw, params, 0, branches) or default_param
        return Exceeded(
            param,
            f"strategy {cls.name!r} with this config may start {branches} upstream calls "
            f"(generations and scoring); this server allows {max_branches} per request",
        )
    if tokens is not None and tokens > max_total_tokens:
        param = _culprit(cls, raw, params, 1, tokens) or default_param
        return Exceeded(
            param,
            f"strategy {cls.name!r} with this config may generate up to {tokens} tokens "
            f"({branches} generations at their max_tokens); this server allows "
            f"{max_total_tokens} per request",
        )
    return None


def prompt_count(prompt: Any) -> int:
    """Prompts in a completions `prompt`: a string or a token-id list is one, a list of either is many."""
    if isinstance(prompt, list) and prompt and not all(isinstance(x, int) for x in prompt):
        return len(prompt)
    return 1


def check_passthrough(body: dict[str, Any], *, max_branches: int, max_total_tokens: int) -> Exceeded | None:
    """A plain request's fan-out: prompts × max(n, best_of) generations, each up to `max_tokens`.
    `n`, `best_of` and `max_tokens` are known to be integers or absent here."""
    prompts = prompt_count(body.get("prompt"))
    width_field = "best_of" if (body.get("best_of") or 0) > (body.get("n") or 1) else "n"
    width = max(body.get("n") or 1, body.get("best_of") or 1)
    branches = prompts * width
    if branches > max_branches:
        param = "prompt" if prompts > 1 else width_field
        return Exceeded(
            param,
            f"this request asks for {branches} generations ({prompts} prompt(s) × {width}); "
            f"this server allows {max_branches} per request",
        )
    per = body.get("max_completion_tokens") or body.get("max_tokens")
    if per is not None and branches * per > max_total_tokens:
        field = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        return Exceeded(
            field,
            f"this request may generate {branches * per} tokens ({branches} generations × "
            f"{field} {per}); this server allows {max_total_tokens} per request",
        )
    return None
