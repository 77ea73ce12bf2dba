"""Budgets a Context enforces by aborting branches."""

from __future__ import annotations

from pydantic import Field

from ttscale.types import StrictModel


class Budget(StrictModel):
    """Limits on one run. `None` means unlimited.

    - `total_tokens`: generated tokens over all branches (cost).
    - `sequential_tokens`: generated tokens on the critical path (latency).
    - `sequential_io_tokens`: prompt + generated tokens on the critical path (`Usage.sequential_prompt_tokens +
      Usage.sequential_tokens`): PDR's sequential budget, where a distill call reads every draft.
    - `wall_time_s`: deadline from the Context's start.
    """

    total_tokens: int | None = Field(None, ge=1)
    sequential_tokens: int | None = Field(None, ge=1)
    sequential_io_tokens: int | None = Field(None, ge=1)
    wall_time_s: float | None = Field(None, gt=0)


class Limits(StrictModel):
    """How hard a Context may push the backend: concurrent branches and requests per second."""

    max_concurrency: int | None = Field(None, ge=1)
    requests_per_s: float | None = Field(None, gt=0)


def budget_from_flags(total_tokens: int | None, sequential_tokens: int | None, wall_time_s: float | None) -> Budget:
    """The Budget of the CLI's `--budget-tokens` / `--budget-sequential` / `--deadline`, refusing a value that
    is not positive with a ConfigError naming the flag (a bad flag is bad input: exit code 2)."""
    from ttscale.errors import ConfigError

    for flag, value in (("--budget-tokens", total_tokens), ("--budget-sequential", sequential_tokens),
                        ("--deadline", wall_time_s)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be > 0 (got {value})")
    return Budget(total_tokens=total_tokens, sequential_tokens=sequential_tokens, wall_time_s=wall_time_s)
