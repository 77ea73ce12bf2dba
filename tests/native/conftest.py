from tests.fixtures.native import native_pair, native_pair_1layer  # noqa: F401
