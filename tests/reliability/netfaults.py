"""Fault injection helpers: a loopback TCP relay that can be partitioned, and a device process.

``PartitionRelay`` sits between a device and the hub (device -> relay port -> hub endpoint). While
partitioned it forwards nothing in either direction and reads nothing, so the kernel buffers fill
and both sides see a silent link, as with a cable pulled or a radio out of range; connections stay
open (no reset) and new ones are accepted but get no bytes through. ``heal()`` resumes forwarding of
whatever was queued. ``close()`` stops every thread it started.

``DeviceProcess`` runs the real agent loop (``DraftRuntime`` + the draft model) in a child process
(tests/reliability/device_proc.py) so a test can SIGKILL it mid-request.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


class PartitionRelay:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._partitioned = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.bytes_relayed = 0
        self._accept = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._accept.start()

    def partition(self) -> None:
        self._partitioned.set()

    def heal(self) -> None:
        self._partitioned.clear()

    def close(self) -> None:
        self._stop.set()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)
        self._listener.close()
        assert not any(t.is_alive() for t in [self._accept, *self._threads]), "relay threads alive"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                down.close()
                continue
            self.connections += 1
            t = threading.Thread(target=self._pump, args=(down, up), name="relay-pump", daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._stop.is_set():
                if self._partitioned.is_set():
                    time.sleep(0.01)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
                    self.bytes_relayed += len(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()


DEVICE_SCRIPT = Path(__file__).with_name("device_proc.py")


class DeviceProcess:
    """The agent's drafting loop in a child process; ``session_id`` once it has handshaken."""

    def __init__(self, edge: str, draft_dir: str | Path, log_path: Path,
                 extra: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in kill())
        self.proc = subprocess.Popen(
            [sys.executable, str(DEVICE_SCRIPT), edge, str(draft_dir), *extra],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
            start_new_session=True)
        self.session_id = ""

    def wait_session(self, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("SESSION "):
                    self.session_id = line.split()[1]
                    return self.session_id
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"device process gave no session (exit {self.proc.poll()}); "
                           f"log: {self._log.name}")

    def kill(self) -> None:
        """SIGKILL: no goodbye, no socket shutdown by the process itself."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
