"""Non-blocking intake over loopback: the real DraftHub, scripted devices, the batched fake engine
driving `Intake` as the proposer does (vllm_tslt/edge/intake.py, docs/intake.md).

Assertions are on what the engine and the hub counted (steps waited for a request, steps parked,
drafted steps), not on wall-clock thresholds; each test runs its control in the same test.
"""

from __future__ import annotations

import time

import pytest

from vllm_tslt.edge.intake import Intake
from vllm_tslt.testing.devices import TableDevice
from vllm_tslt.testing.engine import BatchEngine, Job
from vllm_tslt.testing.peers import VOCAB_SIZE, make_hub
from vllm_tslt.testing.targets import TableTarget

pytestmark = pytest.mark.integration

TOKENS = 48


def serve(mode, devices, jobs, step_s, deadline_ms=300, max_park_steps=2, tokens=TOKENS):
    """Run `jobs` (greedy) through a fresh hub; returns (outputs, engine stats, hub counters)."""
    target = TableTarget(VOCAB_SIZE, seed=0)
    hub = make_hub(draft_deadline_ms=deadline_ms, intake=mode,
                   intake_max_park_steps=max_park_steps)
    peers = [TableDevice(hub.endpoint, target, gamma=3, name=name, delay_s=delay, seed=i).start()
             for i, (name, delay) in enumerate(devices)]
    sessions = {p.name: p.session_id for p in peers}
    try:
        engine = BatchEngine(hub, target, step_s=step_s, intake=Intake.from_config(hub.config))
        outs = engine.run([Job(rid, sessions.get(dev, ""), prompt, tokens, temperature=0.0)
                           for rid, dev, prompt in jobs], concurrency=len(jobs))
        for p in peers:
            assert p.error is None, p.error
        for rid, _, prompt in jobs:  # exact, and nobody starved
            assert outs[rid] == target.greedy(prompt, tokens), rid
        return engine.stats, hub.snapshot()
    finally:
        for p in peers:
            p.stop()
        hub.close()


def test_a_slow_device_does_not_stall_a_fast_one():
    # The slow device answers 25 steps after a commit (still > 5 steps on a loaded box, where
    # steps take longer): neither waiting for it nor parking it (max 2 steps) pays.
    devices = [("fast", 0.0), ("slow", 0.5)]
    jobs = [("fast", "fast", [1, 2, 3]), ("slow", "slow", [4, 5, 6])]
    run = dict(step_s=0.02, deadline_ms=1000, tokens=24)
    adaptive, snap = serve("adaptive", devices, jobs, **run)
    # Waited for the slow device only before the step time was measured (the first step).
    assert adaptive.waited.get("slow", 0) <= 2, adaptive
    assert snap["intake_plain"] >= 10, snap  # it decoded plainly instead (22 of its 24 tokens)
    # The fast device kept drafting and its drafts were used, more often than the slow one's.
    # NOTE: not "most of its steps": on a loaded box its first drafts can look late too, and the
    # policy then decodes it plainly for a while (7 of 8 quiet runs had most steps drafted).
    assert adaptive.drafted.get("fast", 0) > adaptive.drafted.get("slow", 0), adaptive
    # Control, same devices: "wait" (the behaviour before intake) waits for the slow device in
    # every step it is in flight, and the hub's wait time shows the stall.
    waiting, wait_snap = serve("wait", devices, jobs, **run)
    assert waiting.waited["slow"] >= 4, waiting  # every step until it finished (6 at τ = 4)
    assert snap["wait_us"] < 0.5 * wait_snap["wait_us"], (snap, wait_snap)


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


@pytest.mark.parametrize("mode", ["adaptive", "wait"])
def test_a_late_draft_brings_a_missed_device_back_under_adaptive_only(mode):
    """Three missed waits make a session unresponsive (not waited for). Under "adaptive" a late
    draft proves the device alive and clears that (the policy weighs its measured lateness);
    under "wait" it does not (a device slower than the deadline would cost one every step)."""
    from vllm_tslt.edge.hub import MAX_MISSED_DEADLINES
    from vllm_tslt.testing.peers import Peer, make_draft

    hub = make_hub(draft_deadline_ms=50, intake=mode)
    dev = Peer(hub.endpoint)
    try:
        sid = dev.handshake().session_id
        assert hub.start_request("r1", sid, [1, 2], {})
        dev.recv()
        for _ in range(MAX_MISSED_DEADLINES):
            assert hub.collect(["r1"], 0.01) == {}
        assert hub.in_flight(["r1"]) == {}  # unresponsive: nothing to wait for
        hub.commit("r1", 3, [5])
        dev.send(make_draft(1, [1, 2]))  # answers the old commit: late
        deadline = time.monotonic() + 5
        while hub.snapshot().get("dropped_late", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hub.snapshot()["dropped_late"] == 1
        in_flight = hub.in_flight(["r1"])
        if mode == "adaptive":
            assert list(in_flight) == ["r1"] and in_flight["r1"] is not None  # lateness measured
        else:
            assert in_flight == {}
    finally:
        dev.close()
        hub.close()
