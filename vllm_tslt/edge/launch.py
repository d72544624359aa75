"""Start and stop a real `vllm-tslt serve` (== `vllm serve`) child process: demo, tests, benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path, log_path: Path, speculative: dict | None = None,
                extra_args: Sequence[str] = (), startup_timeout_s: float = 600,
                max_model_len: int = 1024, cpus: set[int] | None = None) -> Iterator[str]:
    """Yields the API base URL once `/v1/models` answers; kills the whole process group on exit.

    ``cpus``: pin the server and every process it starts to these CPUs (benchmarks)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm_tslt.cli", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
           "--enforce-eager", "--seed", "0", *extra_args]
    if speculative is not None:
        cmd += ["--speculative-config", json.dumps(speculative)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with open(log_path, "w") as log:
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=pin)
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
