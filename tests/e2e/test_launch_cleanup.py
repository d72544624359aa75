"""A real `vllm serve` started by vllm_tslt.edge.launch.vllm_server does not outlive its launcher
when the launcher is SIGKILLed (issue 17, part 5): neither the API server nor vLLM's EngineCore.

The launcher is a Python process running `with vllm_server(...)`, as a test module or a benchmark
does; it gets SIGKILL (no `finally` runs) once the server answers. Every process descending from
the server must be gone within the watchdog's grace period, and `ps` must show nothing of the
server's process group. tests/integration/test_launch.py covers SIGTERM and SIGINT in seconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_tslt.edge.launch import LAUNCHER_GRACE_S

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LAUNCHER = """
import sys, time
from pathlib import Path
from vllm_tslt.edge.launch import vllm_server
with vllm_server(Path(sys.argv[1]), Path(sys.argv[2]), max_model_len=256) as url:
    print(url, flush=True)
    time.sleep(600)
"""


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) of every process (Linux /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(root: int) -> set[int]:
    table = process_table()
    found, frontier = set(), {root}
    while frontier:
        found |= frontier
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - found
    return found - {root}


def running(pids: set[int]) -> set[int]:
    table = process_table()
    return {pid for pid in pids if pid in table and table[pid][2] != "Z"}


def test_sigkilled_launcher_leaves_no_vllm_process(tiny_pair, tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    log = tmp_path / "vllm.log"
    launcher = subprocess.Popen([sys.executable, str(script), str(tiny_pair.target), str(log)],
                                stdout=subprocess.PIPE, text=True)
    tree: set[int] = set()
    try:
        ready, _, _ = select.select([launcher.stdout], [], [], 600)
        assert ready and launcher.stdout.readline().startswith("http"), log.read_text()[-3000:]
        tree = descendants(launcher.pid)
        assert len(tree) >= 2, f"expected the API server and its EngineCore, found {tree}"
        table = process_table()
        server = next(pid for pid in tree if table[pid][0] == launcher.pid)
        server_group = table[server][1]
        assert server_group == server, "vllm_server starts the server in a process group of its own"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 2 * LAUNCHER_GRACE_S + 30
        while running(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        ps = subprocess.run(["ps", "-eo", "pid,pgid,stat,args"], capture_output=True, text=True)
        left = [line for line in ps.stdout.splitlines()[1:]
                if int(line.split()[1]) == server_group and "Z" not in line.split()[2]]
        assert not running(tree) and not left, \
            f"still running after the launcher was SIGKILLed: {running(tree)}\n" + "\n".join(left)
    finally:
        for pid in [launcher.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(10)
