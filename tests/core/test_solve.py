"""`solve()` is the blocking one-liner; inside a running event loop it must point to `asolve`."""

from __future__ import annotations

import pytest

from ttscale import asolve, solve
from ttscale.backends.scripted import ScriptedBackend
from ttscale.errors import ConfigError


def test_solve_outside_a_loop_returns_the_majority() -> None:
    backend = ScriptedBackend(["so \\boxed{4}", "so \\boxed{5}", "so \\boxed{4}"])
    result = solve("What is 2 + 2?", "self-consistency:n=3", backend)
    assert result.answer == "4"


async def test_solve_inside_a_running_loop_names_asolve() -> None:
    backend = ScriptedBackend(["\\boxed{4}"])
    with pytest.raises(ConfigError, match="asolve"):
        solve("What is 2 + 2?", "single", backend)
    assert backend.requests == []  # refused before anything ran
    result = await asolve("What is 2 + 2?", "single", backend)
    assert result.answer == "4"
