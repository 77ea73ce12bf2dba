"""A killed test run leaves no server processes behind (issue 17, item 13 and acceptance 4).

A real pytest process runs a test that starts a process tree the way the vLLM fixtures start a server
(`tests.fixtures.real_backends.spawn_process_group`: a group leader with a worker child, as the API server
has its EngineCore), or a real vLLM server through `VLLMServer`. The outer test kills that pytest and scans
/proc: within 10 s no process of the tree, and no watchdog, may remain.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.fixtures.real_backends import spawn_process_group, stop_process_group

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 10.0

INNER_TEST = '''
import os, subprocess, sys, threading
from tests.fixtures.real_backends import spawn_process_group

TREE = (
    "import signal, subprocess, sys; "
    "subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()', sys.argv[1] + '-worker']); "
    "signal.pause()"
)

def test_holds_a_server_tree():
    marker = os.environ["TREE_MARKER"]
    spawn_process_group([sys.executable, "-c", TREE, marker], stdin=subprocess.DEVNULL)
    threading.Event().wait()  # held here until the outer test kills this pytest
'''


INNER_VLLM_TEST = '''
import os, threading
from pathlib import Path
from tests.fixtures.real_backends import VLLMServer

def test_holds_a_vllm_server(tmp_path):
    server = VLLMServer(Path(os.environ["TINY_MODEL"]), tmp_path / "server.log")
    server.start()
    server.wait_ready()
    Path(os.environ["READY_FILE"]).write_text(str(server.proc.pid))
    threading.Event().wait()  # held here until the outer test kills this pytest
'''


def group_members(pgid: int) -> set[int]:
    """Pids of the live processes in process group `pgid` (from /proc/<pid>/stat)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def processes_with(text: str) -> dict[int, str]:
    """pid -> command line of every process whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


def wait_until(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)  # polling /proc, bounded by the deadline
    return pred()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_pytest_leaves_no_server_processes(sig, tmp_path):
    marker = f"ttscale-tree-{uuid.uuid4().hex[:10]}"
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST, encoding="utf-8")
    env = {**os.environ, "TREE_MARKER": marker, "PYTHONPATH": str(REPO)}
    pytest_proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(inner)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        tree_up = wait_until(lambda: {f"{marker}-worker" in c for c in processes_with(marker).values()} == {
            True, False}, 120)
        assert tree_up, f"the inner test never started its tree: {processes_with(marker)}"
        watchdogs = processes_with("pidfd_open")
        watchdogs = {p: c for p, c in watchdogs.items() if f" {pytest_proc.pid} " in c}
        assert len(watchdogs) == 1, watchdogs
        pytest_proc.send_signal(sig)
        pytest_proc.wait(timeout=30)
        gone = wait_until(lambda: not processes_with(marker) and not any(
            Path(f"/proc/{p}").exists() for p in watchdogs), GONE_WITHIN_S)
        assert gone, f"left running {GONE_WITHIN_S:.0f} s after the kill: {processes_with(marker)}"
    finally:
        if pytest_proc.poll() is None:
            pytest_proc.kill()
            pytest_proc.wait()
        for pid in processes_with(marker):  # only if the test failed: leave nothing behind either way
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stopping_a_group_ends_its_children_and_its_watchdog():
    marker = f"ttscale-tree-{uuid.uuid4().hex[:10]}"
    tree = ("import signal, subprocess, sys; "
            "subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()', "
            "sys.argv[1] + '-worker']); signal.pause()")
    proc = spawn_process_group([sys.executable, "-c", tree, marker], stdin=subprocess.DEVNULL)
    assert wait_until(lambda: len(processes_with(marker)) == 2, 60), processes_with(marker)
    stop_process_group(proc, timeout_s=10)
    assert proc.returncode is not None
    assert wait_until(lambda: not processes_with(marker), GONE_WITHIN_S), processes_with(marker)


@pytest.mark.vllm
@pytest.mark.slow
def test_sigkilled_pytest_leaves_no_vllm_server(tiny_model_dir, tmp_path):
    from tests.fixtures.real_backends import require_vllm

    require_vllm()
    inner = tmp_path / "test_inner_vllm.py"
    inner.write_text(INNER_VLLM_TEST, encoding="utf-8")
    ready = tmp_path / "ready"
    env = {**os.environ, "TINY_MODEL": str(tiny_model_dir), "READY_FILE": str(ready), "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1"}
    pytest_proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(inner)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server_pid = None
    try:
        assert wait_until(lambda: ready.exists() or pytest_proc.poll() is not None, 600), "server never ready"
        assert ready.exists(), f"the inner pytest exited with {pytest_proc.returncode}"
        server_pid = int(ready.read_text())
        members = group_members(server_pid)
        assert server_pid in members and len(members) >= 2, members  # the API server and its engine
        pytest_proc.kill()
        pytest_proc.wait(timeout=30)
        gone = wait_until(lambda: not group_members(server_pid), GONE_WITHIN_S)
        assert gone, f"vLLM processes left {GONE_WITHIN_S:.0f} s after SIGKILL: {group_members(server_pid)}"
    finally:
        if pytest_proc.poll() is None:
            pytest_proc.kill()
            pytest_proc.wait()
        if server_pid is not None and group_members(server_pid):
            os.killpg(server_pid, signal.SIGKILL)  # only if the test failed: leave nothing behind
