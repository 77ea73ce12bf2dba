"""Fixtures shared by the strategy and judge tests (the lead's conftest lists fixture modules by area)."""

from tests.fixtures.judges import embedding_judge  # noqa: F401  (session fixture; the model loads once)
