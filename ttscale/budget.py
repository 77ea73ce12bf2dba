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
