"""Errors with messages that name the problem."""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class TTScaleError(Exception):
    """Base of every error ttscale raises on purpose."""


class ConfigError(TTScaleError, ValueError):
    """A bad config value, strategy spec or backend spec."""


class UnknownNameError(ConfigError, KeyError):
    """An unknown strategy / backend / dataset name; the message lists the known ones."""

    def __init__(self, what: str, name: str, known: list[str]):
        self.what, self.name, self.known = what, name, sorted(known)
        self.suggestions = difflib.get_close_matches(name, self.known, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(s) for s in self.suggestions)}?)" if self.suggestions else ""
        super().__init__(f"unknown {what} {name!r}{hint}; known: {', '.join(self.known)}")

    def __str__(self) -> str:
        return self.args[0]


class CapabilityError(TTScaleError):
    """A strategy needs a capability the backend lacks."""


class BackendUnavailable(TTScaleError, ConnectionError):
    """A server could not be reached, or an engine failed to start."""


class ContextOverflow(TTScaleError, ValueError):
    """The prompt (plus requested tokens) is longer than the model's context."""


class BackendError(TTScaleError, RuntimeError):
    """The backend answered with an error for one request."""


class BackendTimeout(BackendError):
    """A server did not answer in time (connect, first token, idle between tokens or total)."""


async def await_by(aw: Awaitable[T], when: float, message: Callable[[], str]) -> T:
    """Await `aw` until the event loop's clock reads `when`; past it, BackendTimeout(`message()`). A
    TimeoutError from inside `aw` (not this deadline) passes through as it is."""
    cm = asyncio.timeout_at(when)
    try:
        async with cm:
            return await aw
    except TimeoutError as e:
        if not cm.expired():
            raise
        raise BackendTimeout(message()) from e


class BudgetExceeded(TTScaleError):
    """Raised inside a Context when a budget has been spent (branches are aborted first)."""
