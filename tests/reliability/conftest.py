"""Fixtures shared by the proxy tests here: a counting stand-in upstream and a client of the module's proxy.

A module that serves through the proxy defines its own `proxy` fixture (its `ServeConfig`); modules that need
another stand-in (the eval tests) define their own `upstream`, which takes precedence over this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.backends.standins import CountingUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream() as up:
        yield up


@pytest.fixture()
def client(proxy) -> Iterator[httpx.Client]:
    """An HTTP client of the module's `proxy` fixture."""
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        yield c
