"""Serving fixtures live in tests/fixtures/server.py (imported here until the root conftest lists it)."""

from tests.fixtures.server import dead_upstream_proxy, keyed_proxy, proxy  # noqa: F401
