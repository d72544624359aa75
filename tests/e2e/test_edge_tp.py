"""End to end with `--tensor-parallel-size 2` (issue 15): one TP=2 server serves every case here.

Rank 0 owns the hub and broadcasts the q̃ rows each step; the server runs with the debug check
``tp_check`` on, so every case also checks that both ranks sampled the same tokens in every step.
The negative control (rank 1 verifies with one-hot rows instead of rank 0's q̃) runs last: it
makes rank 1's state diverge for that request on purpose.
Also here: `--pipeline-parallel-size 2` is refused at start (no engine starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from vllm_tslt.testing.devices import ModelDevice

from .continuations import chi_square_p, continuation_cells
from .server import free_port, metrics, vllm_server
from .test_edge_serve import _greedy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DEADLINE_MS = 3000
DIVERGENT = "vllm_tslt_tp_divergent_steps_total"
VERIFIED = "vllm_tslt_draft_tokens_verified_total"


def test_pipeline_parallel_is_refused_at_start(tiny_pair, tmp_path):
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{free_port()}"}
    cmd = [sys.executable, "-m", "vllm_tslt.cli", "serve", str(tiny_pair.target), "--port",
           str(free_port()), "--dtype", "float32", "--max-model-len", "512",
           "--pipeline-parallel-size", "2", "--speculative-config", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "cannot run with --pipeline-parallel-size 2" in out, out[-3000:]
    assert "--tensor-parallel-size" in out
    assert "TSLT draft hub listening" not in out


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{hub_port}",
            "draft_deadline_ms": DEADLINE_MS, "tp_check": True}
    log = tmp_path_factory.mktemp("edge_tp") / "vllm.log"
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_TSLT_TEST_SWITCHES")}
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # `vllm-tslt serve` must pick one itself
    os.environ["VLLM_TSLT_TEST_SWITCHES"] = "1"  # the negative control's switch
    try:
        with vllm_server(tiny_pair.target, log, spec,
                         extra_args=["--tensor-parallel-size", "2"]) as url:
            yield {"url": url, "hub": f"tcp://127.0.0.1:{hub_port}", "log": log}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value



@pytest.fixture(scope="module")
def device(edge, tiny_pair):
    dev = ModelDevice(edge["hub"], tiny_pair.draft)
    assert dev.handshake().session_id
    dev.start()
    yield dev
    dev.stop()



def _session(dev, **extra) -> dict:
    return {"vllm_xargs": {"tslt_session": dev.session_id, **extra}}


def test_tp2_starts_with_a_thread_binding_and_the_hub_on_rank_0(edge, device):
    log = edge["log"].read_text()
    assert "using VLLM_CPU_OMP_THREADS_BIND=" in log, "serve did not pick a thread binding"
    assert log.count("TSLT draft hub listening on") == 1, "exactly one hub (TP rank 0)"
    assert "data_parallel_rank" not in device.reply.limits  # DP = 1: no routing header


def test_tp2_greedy_equals_target_alone(edge, client, device, reference):
    before = metrics(edge["url"])
    model = client.models.list().data[0].id
    for prompt in ["def read_config(path):\n", "import os\n\n\nclass "]:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                        extra_body=_session(device))
        assert out.choices[0].text == _greedy(reference, prompt, 24), prompt
    after = metrics(edge["url"])
    assert after[VERIFIED] > before.get(VERIFIED, 0), "no remote draft was verified"
    assert after.get(DIVERGENT, 0) == 0


def test_tp2_samples_follow_the_target_with_a_device_drafting(edge, client, device, reference):
    """Chi-square of 3-token continuations (300 samples) against the exact target probabilities,
    p > 1e-4; the same statistic rejects a lying device in test_edge_serve (its negative control).
    Both ranks sample the same tokens in every step (tp_check)."""
    prompt = "    def "
    cells = continuation_cells(reference, prompt, 3)
    before = metrics(edge["url"])
    model = client.models.list().data[0].id
    samples = []
    for _ in range(6):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=3, n=50, temperature=1.0,
            extra_body={**_session(device), "return_token_ids": True})
        samples.extend(tuple(c.token_ids) for c in out.choices if len(c.token_ids) == 3)
    after = metrics(edge["url"])
    assert after[VERIFIED] - before.get(VERIFIED, 0) > 100, "too few drafts verified"
    assert len(samples) > 250
    p = chi_square_p(samples, cells)
    assert p > 1e-4, f"TP=2 with a device drafting: p={p:.2e}"
    assert after.get(DIVERGENT, 0) == 0, "TP ranks sampled different tokens"


def test_tp_check_catches_rank_1_using_another_q(edge, client, device):
    """Negative control (runs last): rank 1 verifies with one-hot rows, rank 0 with the device's
    q̃; the ranks' accept decisions differ and the debug check must see it."""
    before = metrics(edge["url"]).get(DIVERGENT, 0)
    model = client.models.list().data[0].id
    for _ in range(3):
        client.completions.create(model=model, prompt="x = [", max_tokens=16, n=4,
                                  temperature=1.0,
                                  extra_body=_session(device, tslt_test_tp_perturb=True))
        if metrics(edge["url"]).get(DIVERGENT, 0) > before:
            break
    deadline = time.monotonic() + 5  # the worker writes its counters every 0.5 s
    while metrics(edge["url"]).get(DIVERGENT, 0) <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metrics(edge["url"]).get(DIVERGENT, 0) > before, "tp_check missed a rank divergence"
    assert "TSLT tp_check: TP ranks [1] sampled other tokens" in edge["log"].read_text()
