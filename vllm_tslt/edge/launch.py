"""Start and stop a real `vllm-tslt serve` (== `vllm serve`) child process: demo, tests, benchmarks.

A server must not outlive whoever started it, also when that process is killed without a chance to
clean up (SIGKILL; SIGTERM, which Python does not turn into an exception; a crashed runner). Two
halves, both here:

- the launcher (`vllm_server`, `spawn_server`) starts the server in a process group of its own, with
  ``PR_SET_PDEATHSIG`` = SIGTERM (the kernel signals it when the launching thread dies; this covers
  the server's interpreter start-up, before any child exists) and ``VLLM_TSLT_LAUNCHER_PID`` set;
- the server (`vllm_tslt.serve` calls `exit_with_launcher` first thing) replaces that with a
  watchdog thread: once its parent is no longer the launcher, it stops every other process of its
  process group — vLLM's EngineCore and workers — then itself: SIGTERM, and SIGKILL to whoever is
  still there `LAUNCHER_GRACE_S` later.

NOTE: ``PR_SET_PDEATHSIG`` fires when the *thread* that started the server exits: start servers
from a thread that lives as long as they should (the main thread, as every caller here does).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from vllm_tslt import envs

logger = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "VLLM_TSLT_LAUNCHER_PID"  # read by envs.launcher_pid()
LAUNCHER_GRACE_S = 5.0  # SIGTERM to the server's process group, then SIGKILL this much later
WATCH_INTERVAL_S = 0.2  # how often the server checks that its launcher is alive
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path, log_path: Path, speculative: dict | None = None,
                extra_args: Sequence[str] = (), startup_timeout_s: float = 600,
                max_model_len: int = 1024, cpus: set[int] | None = None,
                env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yields the API base URL once `/v1/models` answers; kills the whole process group on exit.

    ``cpus``: pin the server and every process it starts to these CPUs (benchmarks).
    ``env``: extra environment variables for the server."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm_tslt.cli", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
           "--enforce-eager", "--seed", "0", *extra_args]
    if speculative is not None:
        cmd += ["--speculative-config", json.dumps(speculative)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    with open(log_path, "w") as log:
        proc = spawn_server(cmd, log, env, cpus)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log_path}\n"
                                   f"{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve not ready after {startup_timeout_s:.0f} s; "
                                       f"log: {log_path}") from None
                time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def spawn_server(cmd: Sequence[str], log: IO, env: Mapping[str, str],
                 cpus: set[int] | None = None) -> subprocess.Popen:
    """Start `cmd` (a `vllm-tslt serve` command line) tied to this process: its own process group
    (so it can be stopped as a whole), stdout and stderr to `log`, pinned to `cpus` if given."""
    launcher = os.getpid()
    return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                            env={**env, LAUNCHER_PID_ENV: str(launcher)}, start_new_session=True,
                            preexec_fn=_server_preexec(launcher, cpus))


def _server_preexec(launcher: int, cpus: set[int] | None) -> Callable[[], None]:
    set_death_signal = _parent_death_signal_setter()  # resolved before fork: the child only calls

    def preexec() -> None:  # runs in the child between fork and exec
        set_death_signal(signal.SIGTERM)
        if os.getppid() != launcher:  # the launcher died before the death signal was armed
            os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return preexec


def _parent_death_signal_setter() -> Callable[[int], None]:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux (0 disarms it); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return lambda sig: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal(sig: int) -> None:
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    return set_death_signal


def exit_with_launcher() -> bool:
    """In a server started by `spawn_server`: stop this server and every process in its group once
    the launcher is gone. Call it before vLLM starts any child. False (and nothing done) in a
    server started otherwise."""
    launcher = envs.launcher_pid()
    if launcher is None:
        return False
    # From here the watchdog stops the whole group; the kernel's SIGTERM would stop this process
    # only, possibly before vLLM can stop its EngineCore.
    _parent_death_signal_setter()(0)
    threading.Thread(target=_watch_launcher, args=(launcher,), name="tslt-launcher-watch",
                     daemon=True).start()
    return True


def _watch_launcher(launcher: int) -> None:
    while os.getppid() == launcher:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(WATCH_INTERVAL_S)
    me = os.getpid()
    group = os.getpgrp() if os.getpgrp() == me else None  # only spawn_server's group is ours
    logger.warning("vllm-tslt: the process that started this server (pid %d) is gone; stopping "
                   "the server%s", launcher, f" and its process group {group}" if group else "")
    if group is not None:  # the others first, while this process lives to SIGKILL the stubborn
        _stop([pid for pid in _group_members(group) if pid != me])
    _stop([me])


def _stop(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL to whoever is still alive LAUNCHER_GRACE_S later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + LAUNCHER_GRACE_S
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(WATCH_INTERVAL_S)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie is gone for us
    except OSError:
        return False


def _group_members(pgid: int) -> list[int]:
    """Live processes of a process group (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def scrape_metrics(url: str) -> dict[str, float]:
    """The server's Prometheus samples: `name{labels}` -> value."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
