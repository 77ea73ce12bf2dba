"""The eval runner's wrappers (request-id scoping, recording) start the backend they wrap and report its
capabilities as they are after that start, not as they were when wrapped."""

from __future__ import annotations

import pytest

from ttscale.backends.base import BackendBase, Capabilities
from ttscale.evals.bank import RecordingBackend, TraceBank
from ttscale.evals.runner import ScopedIds


class StartsLate(BackendBase):
    """Knows its capabilities only once started, like a server backend."""

    name = "late"

    def __init__(self) -> None:
        self.started = False
        self.capabilities = Capabilities()

    async def start(self) -> StartsLate:
        self.started = True
        self.capabilities = Capabilities(top_logprobs=5, tokenize=True)
        return self


@pytest.mark.parametrize("kind", ["scoped-ids", "recording"])
async def test_wrapper_starts_its_backend_and_reports_its_capabilities(kind, tmp_path):
    inner = StartsLate()
    outer = (ScopedIds(inner) if kind == "scoped-ids"
             else RecordingBackend(inner, TraceBank(tmp_path / "t.db", create=True)))
    assert outer.capabilities.top_logprobs == 0
    assert await outer.start() is outer
    assert inner.started
    assert outer.capabilities.top_logprobs == 5 and outer.capabilities.tokenize
