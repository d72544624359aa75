"""Non-blocking intake over loopback: the real DraftHub, scripted devices, the batched fake engine
driving `Intake` as the proposer does (vllm_tslt/edge/intake.py, docs/intake.md).

Assertions are on what the engine and the hub counted (steps waited for a request, steps parked,
drafted steps), not on wall-clock thresholds; each test runs its control in the same test.
"""

from __future__ import annotations

import pytest

from vllm_tslt.edge.intake import Intake
from vllm_tslt.testing.devices import TableDevice
from vllm_tslt.testing.engine import BatchEngine, Job
from vllm_tslt.testing.peers import VOCAB_SIZE, make_hub
from vllm_tslt.testing.targets import TableTarget

pytestmark = pytest.mark.integration

TOKENS = 48


def serve(mode, devices, jobs, step_s, deadline_ms=300, max_park_steps=2):
    """Run `jobs` (greedy) through a fresh hub; returns (outputs, engine stats, hub counters)."""
    target = TableTarget(VOCAB_SIZE, seed=0)
    hub = make_hub(draft_deadline_ms=deadline_ms, intake=mode,
                   intake_max_park_steps=max_park_steps)
    peers = [TableDevice(hub.endpoint, target, gamma=3, name=name, delay_s=delay, seed=i).start()
             for i, (name, delay) in enumerate(devices)]
    sessions = {p.name: p.session_id for p in peers}
    try:
        engine = BatchEngine(hub, target, step_s=step_s, intake=Intake.from_config(hub.config))
        outs = engine.run([Job(rid, sessions.get(dev, ""), prompt, TOKENS, temperature=0.0)
                           for rid, dev, prompt in jobs], concurrency=len(jobs))
        for p in peers:
            assert p.error is None, p.error
        for rid, _, prompt in jobs:  # exact, and nobody starved
            assert outs[rid] == target.greedy(prompt, TOKENS), rid
        return engine.stats, hub.snapshot()
    finally:
        for p in peers:
            p.stop()
        hub.close()


def test_a_slow_device_does_not_stall_a_fast_one():
    devices = [("fast", 0.0), ("slow", 0.15)]  # the slow one answers 7.5 steps after a commit
    jobs = [("fast", "fast", [1, 2, 3]), ("slow", "slow", [4, 5, 6])]
    adaptive, snap = serve("adaptive", devices, jobs, step_s=0.02)
    # Waited for the slow device only before the step time was measured (the first step).
    assert adaptive.waited.get("slow", 0) <= 2, adaptive
    assert snap["intake_plain"] >= 10, snap  # it decoded plainly instead
    # The fast device kept drafting: most of its steps verified a draft.
    assert adaptive.drafted["fast"] >= 0.5 * adaptive.stepped["fast"], adaptive
    # Control, same devices: "wait" (the behaviour before intake) waits for the slow device in
    # every step it is in flight, and the hub's wait time shows the stall.
    waiting, wait_snap = serve("wait", devices, jobs, step_s=0.02)
    assert waiting.waited["slow"] >= 8, waiting
    assert snap["wait_us"] < 0.25 * wait_snap["wait_us"], (snap, wait_snap)


def test_a_draft_about_a_step_late_parks_its_request_while_the_batch_runs():
    # A device 1.2 steps late with perfect drafts (τ = 4): parking it for 2 steps gains
    # (4 - 3) tokens' worth over plain decoding; waiting 60 ms would stall 2 requests.
    devices = [("late", 0.06)]
    jobs = [("late", "late", [1, 2, 3]), ("alone", None, [7, 8, 9])]  # "alone": no device
    stats, snap = serve("adaptive", devices, jobs, step_s=0.05)
    assert stats.parked.get("late", 0) >= 2 and snap["intake_parks"] >= 2, (stats, snap)
    assert stats.drafted["late"] >= 2, stats  # parked, then verified with its draft
    assert "alone" not in stats.parked
    # The request without a device ran in every step until it finished (never held back).
    assert stats.stepped["alone"] == TOKENS
    # Control: with parking off the same device is never parked.
    stats, snap = serve("adaptive", devices, jobs, step_s=0.05, max_park_steps=0)
    assert not stats.parked and snap.get("intake_parks", 0) == 0
