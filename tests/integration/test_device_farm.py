"""The benchmark's device farm against the real DraftHub and the batched fake engine (no vLLM)."""

from __future__ import annotations

import time

import pytest

from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.drafter import Drafter
from vllm_tslt.bench.farm import DeviceFarm, measure_draft_ms_per_token
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.testing.engine import BatchEngine, Job
from vllm_tslt.testing.targets import HFTarget

pytestmark = pytest.mark.integration

PROMPTS = ["def parse(text):\n    ", "import os\n\nclass Config:\n", "for i in range(",
           "    return self."]


@pytest.fixture(scope="module")
def models(tiny_pair):
    from transformers import AutoModelForCausalLM

    drafter = Drafter(str(tiny_pair.draft), device="cpu")
    target = AutoModelForCausalLM.from_pretrained(tiny_pair.target).eval()
    return drafter, HFTarget(target)


@pytest.fixture()
def hub(models):
    drafter, _ = models
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=500),
                   vocab_size=drafter.vocab_size, vocab_fingerprint=drafter.fingerprint(),
                   model_name="tiny-target", max_gamma=4).start()
    yield hub
    hub.close()


def test_farm_devices_draft_in_shared_forwards_and_greedy_output_is_the_targets(models, hub):
    drafter, target = models
    cfg = AgentConfig(draft_model="unused", edge=hub.endpoint, num_draft_tokens=4)
    with DeviceFarm(cfg, 6, None, draft_ms_per_token=1.0, drafter=drafter) as farm:
        assert farm.wait_sessions(10), farm.failure
        sessions = farm.session_ids
        assert len(set(sessions)) == 6  # one session per device
        jobs = [Job(f"r{i}", sessions[i], drafter.tokenizer(PROMPTS[i % 4])["input_ids"], 24,
                    temperature=0.0) for i in range(6)]
        engine = BatchEngine(hub, target, deadline_s=0.5)
        outs = engine.run(jobs, concurrency=6)
        assert farm.failure is None
        for job in jobs:
            assert outs[job.request_id] == target.greedy(job.prompt, 24)
        deadline = time.monotonic() + 5
        while any(rt.tracks for rt in farm.runtimes) and time.monotonic() < deadline:
            time.sleep(0.01)  # the last commits and End reach the devices
        stats = farm.stats.snapshot()
        device_rounds = sum(rt.stats()["rounds"] for rt in farm.runtimes)
    assert all(engine.stats.drafted.get(j.request_id) for j in jobs), engine.stats
    assert stats["mean_batch"] > 1.5, stats  # devices drafted together, not one by one
    assert device_rounds >= 0.8 * sum(engine.stats.drafted.values())  # commits reached devices


def test_a_device_is_busy_for_its_modelled_drafting_time(models, hub):
    """With the farm's clock frozen, a device that started an extension drafts nothing more and
    sends nothing until the clock passes draft_ms_per_token."""
    drafter, target = models
    now = [1000.0]
    cfg = AgentConfig(draft_model="unused", edge=hub.endpoint, num_draft_tokens=4)
    farm = DeviceFarm(cfg, 1, None, draft_ms_per_token=30.0, drafter=drafter,
                      clock=lambda: now[0])
    rt = farm.runtimes[0]
    try:
        deadline = time.monotonic() + 10
        while not rt.session_id and time.monotonic() < deadline:
            farm.run_once()
            now[0] += 1.0  # housekeeping keeps the client serviced
        assert rt.session_id
        engine = BatchEngine(hub, target, deadline_s=0.0)
        engine.admit(Job("r0", rt.session_id, drafter.tokenizer(PROMPTS[0])["input_ids"], 16,
                         temperature=0.0))
        while not rt.tracks:
            farm.run_once()
        track = next(iter(rt.tracks.values()))
        for _ in range(5):  # frozen clock: one extension in progress, nothing sent
            farm.run_once()
        assert track.state.chain_len == 1 and track.sent is None
        assert farm.devices[0].drafting
        for i in range(2, 5):  # each 30 ms of device time adds one chain token
            now[0] += 0.030
            farm.run_once()
            assert track.state.chain_len == i
        now[0] += 0.030
        farm.run_once()  # the fourth token's time is over: the γ = 4 draft leaves
        assert track.sent is not None and len(track.sent.tokens) == 4
    finally:
        farm.stop()


def test_measured_draft_time_is_positive(models):
    drafter, _ = models
    assert measure_draft_ms_per_token(drafter, context=16, repeats=3) > 0
