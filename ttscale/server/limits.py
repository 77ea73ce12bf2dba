"""Fan-out limits of the proxy: how many upstream calls and tokens one request may start, before it starts.

A strategy request's bound comes from its config (`Strategy.max_branches` / `max_tokens_bound`, pure
class methods), a pass-through request's from its prompt list, `n`, `best_of` and `max_tokens`. Pure
functions: the server turns an `Exceeded` into a 400 naming the field; a strategy's message also says which
settings the bound grows with, the widest `NAME-N` that fits, and the server flag that raises the limit.
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


def _setting(field: str, params: dict[str, str]) -> str:
    """The request field a client sets config `field` with: the body field it came from (`max_tokens`), else
    `ttscale.FIELD` (which also overrides a value the model prefix gave)."""
    given = params.get(field)
    if given is not None and given not in ("model", "ttscale.strategy"):
        return given
    return "max_tokens" if field == "max_tokens" else f"ttscale.{field}"


def _at_width(cls: type[Strategy], config: StrategyConfig, which: int, width: int) -> int | None:
    return _bounds(cls, config.model_copy(update=cls.Config.width_values(width) or {}))[which]


def _widest(cls: type[Strategy], config: StrategyConfig, which: int, limit: int) -> int | None:
    """The widest `NAME-N` whose bound fits `limit` with the rest of `config` as it is (None: not even 1)."""
    def fits(width: int) -> bool:
        bound = _at_width(cls, config, which, width)
        return bound is None or bound <= limit

    if not fits(1):
        return None
    lo, hi = 1, limit  # the bound grows with the width
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _hint(cls: type[Strategy], config: StrategyConfig, raw: dict[str, Any], params: dict[str, str], which: int,
          limit: int, flag: str) -> str:
    """How to get under the limit: the settings the bound grows with (integer fields whose value at 1 lowers
    it, and the width) with their values, the widest width that fits with the rest as it is, and the
    server flag that raises the limit."""
    current = _bounds(cls, config)[which]
    width_field = cls.Config.width_field
    growing = []
    for field, value in config.model_dump().items():
        if field == width_field and not isinstance(value, int):
            lowered = _at_width(cls, config, which, 1)  # a width that is no number (PDR's schedule)
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 1:
            continue
        else:
            try:  # validated: a field may set others (SR's rounds set its schedule)
                lowered = _bounds(cls, cls.Config(**{**raw, field: 1}))[which]
            except ValidationError:  # 1 is not valid with the rest (short-m's m > k): the bound's arithmetic
                lowered = _bounds(cls, config.model_copy(update={field: 1}))[which]
        if lowered is not None and current is not None and lowered < current:
            default = "" if field in raw else ", the default"
            growing.append(f"{_setting(field, params)} ({value}{default})")
    widest = _widest(cls, config, which, limit) if width_field is not None else None
    fits = ""
    if widest is not None and width_field is not None:
        prefix = f"the model prefix {cls.name}-{widest}/MODEL"
        by_request = params.get(width_field, "model") not in ("model", "ttscale.strategy")  # a prefix is overridden
        if isinstance(getattr(config, width_field), int):
            fits = f"{_setting(width_field, params)}={widest} fits" + ("" if by_request else f": {prefix}")
        elif not by_request:
            fits = f"{prefix} fits"
        fits = f" (with the rest as it is, {fits})" if fits else ""
    lower = f"It grows with {' and '.join(growing)}: lower {'it' if len(growing) == 1 else 'them'}{fits}, or" \
        if growing else "Lower the strategy's settings, or"
    return f"{lower} start the server with a higher {flag}"


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
            f"(generations and scoring); this server allows {max_branches} per request. "
            + _hint(cls, config, raw, params, 0, max_branches, "--max-branches"),
        )
    if tokens is not None and tokens > max_total_tokens:
        param = _culprit(cls, raw, params, 1, tokens) or default_param
        return Exceeded(
            param,
            f"strategy {cls.name!r} with this config may generate up to {tokens} tokens "
            f"({branches} generations at their max_tokens); this server allows "
            f"{max_total_tokens} per request. "
            + _hint(cls, config, raw, params, 1, max_total_tokens, "--max-total-tokens"),
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
