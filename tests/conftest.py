"""Shared test configuration. Each area keeps its fixtures in tests/fixtures/<area>.py."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # the tests make no network calls, telemetry neither

pytest_plugins = [
    p
    for p in (
        "tests.fixtures.real_backends",
        "tests.fixtures.engine",
        "tests.fixtures.core",
        "tests.fixtures.server",
        "tests.fixtures.judges",
        "tests.fixtures.native",
    )
    if os.path.exists(os.path.join(os.path.dirname(__file__), "fixtures", p.rsplit(".", 1)[1] + ".py"))
]
