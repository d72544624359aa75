"""A server started through vllm_tslt.edge.launch does not outlive its launcher (issue 17, part 5).

A stand-in server (a Python process that calls `exit_with_launcher`, as `vllm-tslt serve` does,
and starts a child that ignores SIGTERM: a stubborn EngineCore) is started by a launcher process
through `spawn_server`; the launcher is then killed the ways a test runner dies. The server and its
child must be gone within the grace period. tests/e2e/test_launch_cleanup.py does the same with a
real `vllm serve`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_tslt.edge.launch import LAUNCHER_GRACE_S

pytestmark = pytest.mark.integration

LAUNCHER = """
import os, signal, sys, time
from vllm_tslt.edge.launch import spawn_server
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, also when started in background
with open(sys.argv[2], "w") as log:
    proc = spawn_server([sys.executable, sys.argv[1]], log, dict(os.environ))
print(proc.pid, flush=True)
time.sleep(600)
"""

SERVER = """
import subprocess, sys, time
from vllm_tslt.edge.launch import exit_with_launcher
assert exit_with_launcher(), "VLLM_TSLT_LAUNCHER_PID was not set"
stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('READY', flush=True); time.sleep(600)")
child = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
child.stdout.readline()  # its SIGTERM handler is in place
print("CHILD", child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for a reaper, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture()
def launched(tmp_path):
    """(launcher process, server pid, server's child pid); everything killed afterwards."""
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "server.py").write_text(SERVER)
    log = tmp_path / "server.log"
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"),
                                 str(tmp_path / "server.py"), str(log)],
                                stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        server = int(launcher.stdout.readline())
        pids.append(server)
        assert wait_for(lambda: "CHILD" in log.read_text(), 60), log.read_text()
        child = int(log.read_text().split("CHILD")[1].split()[0])
        pids.append(child)
        yield launcher, server, child
    finally:
        for pid in [launcher.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(10)


def test_the_server_runs_while_its_launcher_lives(launched):
    launcher, server, child = launched
    time.sleep(1.0)  # several watchdog rounds
    assert launcher.poll() is None and alive(server) and alive(child)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killing_the_launcher_stops_the_server_and_its_children(launched, sig):
    launcher, server, child = launched
    launcher.send_signal(sig)
    launcher.wait(10)
    # The server stops its group (the child ignores SIGTERM: SIGKILL after the grace), then itself.
    assert wait_for(lambda: not alive(server) and not alive(child), 2 * LAUNCHER_GRACE_S + 10), \
        f"still running after the launcher got {sig!r}: server {alive(server)}, child {alive(child)}"
