"""`vllm-tslt agent` as a process: connects, serves /health, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import vocab_fingerprint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_agent_process_runs_until_sigterm(tiny_pair):
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(tiny_pair.draft).vocab_size
    fp = vocab_fingerprint(AutoTokenizer.from_pretrained(tiny_pair.draft).get_vocab())
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0"), vocab_size=vocab, vocab_fingerprint=fp,
                   model_name="tiny-target", max_gamma=4).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_tslt.cli", "agent", "--draft-model", str(tiny_pair.draft),
         "--edge", hub.endpoint, "--api", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}",
         "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                if health["session"]:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert health and health["session"] and hub.has_session(health["session"]), proc.poll()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        deadline = time.monotonic() + 5
        while hub.has_session(health["session"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not hub.has_session(health["session"])  # the agent said goodbye
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out = proc.stdout.read() if proc.stdout else ""
        hub.close()
    assert "session" in out
