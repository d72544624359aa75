"""Fault injection at the hub level (issue 8, part 4): the real DraftHub, the agent's real drafting
loop (``DraftRuntime`` with the tiny pair's draft model), a fake engine verifying against the tiny
pair's target (``BatchEngine`` + ``HFTarget``), greedy requests.

Faults: a device stalling past the deadline, a device process SIGKILLed mid-request, the edge's hub
restarted while the agent runs, network partitions shorter and longer than the agent's silence
timeout. Each test asserts that every request completes with the target's own greedy output, that
drafts come back after the fault where they can, and that the hub's tables return to baseline
(no requests; vanished devices' sessions expire). ``test_edge_memory_returns_to_baseline`` checks
the edge's Python memory with tracemalloc over many requests and vanishing devices.
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import pytest

from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.drafter import Drafter
from vllm_tslt.agent.runtime import DraftRuntime
from vllm_tslt.edge import sessions as sessions_module
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import MAX_MISSED_DEADLINES, DraftHub
from vllm_tslt.edge.launch import free_port
from vllm_tslt.testing.devices import TableDevice
from vllm_tslt.testing.engine import BatchEngine, Job
from vllm_tslt.testing.peers import FINGERPRINT
from vllm_tslt.testing.targets import HFTarget, TableTarget

from .netfaults import DeviceProcess, PartitionRelay

pytestmark = pytest.mark.integration

DEADLINE_S = 0.1
STEP_S = 0.02  # emulated target step: the device drafts while the edge "computes"
PROMPTS = ["def parse(text):\n    ", "import os\n\nclass Config:\n", "for i in range(",
           "    return "]


@pytest.fixture(scope="module")
def models(tiny_pair):
    from transformers import AutoModelForCausalLM

    drafter = Drafter(str(tiny_pair.draft), device="cpu")
    target = HFTarget(AutoModelForCausalLM.from_pretrained(tiny_pair.target))
    return drafter, target


@pytest.fixture()
def fast_idle_expiry(monkeypatch):
    """Sessions without requests expire after 1 s instead of 300 s (the sweep runs every 5 s)."""
    monkeypatch.setattr(sessions_module, "SESSION_IDLE_TIMEOUT_S", 1.0)


def make_hub(drafter, port: int = 0) -> DraftHub:
    return DraftHub(TsltConfig(bind=f"tcp://127.0.0.1:{port}", draft_deadline_ms=DEADLINE_S * 1000),
                    vocab_size=drafter.vocab_size, vocab_fingerprint=drafter.fingerprint(),
                    model_name="tiny-target", max_gamma=4).start()


def make_runtime(drafter, edge: str, **options) -> DraftRuntime:
    cfg = AgentConfig(draft_model="unused", edge=edge, num_draft_tokens=4, **options)
    runtime = DraftRuntime(cfg, drafter)
    runtime.start()
    return runtime


def prompt_ids(drafter, i: int) -> list[int]:
    return drafter.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def drafted_in(engine: BatchEngine) -> int:
    return sum(engine.stats.drafted.values())


class StepLog:
    """on_step hook: runs scheduled actions at given engine steps, records drafted steps per step."""

    def __init__(self, engine: BatchEngine, actions: dict[int, object]) -> None:
        self.engine, self.actions = engine, actions
        self.drafted: list[int] = []  # cumulative drafted steps after each engine step

    def __call__(self, step: int) -> None:
        self.drafted.append(drafted_in(self.engine))
        action = self.actions.get(step)
        if action is not None:
            action()

    def drafted_between(self, first: int, last: int) -> int:
        """Drafted steps among engine steps first+1 .. last (1-based step numbers)."""
        return self.drafted[min(last, len(self.drafted)) - 1] - self.drafted[first - 1]


# ----------------------------------------------------------------------------------------------


def test_device_stalling_past_the_deadline(models, monkeypatch):
    """The device's loop blocks (a stalled process) for a dozen steps, then resumes."""
    drafter, target = models
    hub = make_hub(drafter)
    release = threading.Event()
    release.set()
    extend = drafter.extend

    def stalling_extend(states):
        assert release.wait(30), "stall never released"
        extend(states)

    monkeypatch.setattr(drafter, "extend", stalling_extend)
    runtime = make_runtime(drafter, hub.endpoint)
    try:
        assert runtime.wait_session(10), runtime.failure
        engine = BatchEngine(hub, target, deadline_s=DEADLINE_S, step_s=STEP_S)
        waited = {}
        log = StepLog(engine, {
            4: lambda: (release.clear(), waited.setdefault("start", hub.snapshot()["wait_us"])),
            16: lambda: (waited.setdefault("end", hub.snapshot()["wait_us"]), release.set())})
        prompt = prompt_ids(drafter, 0)
        out = engine.run([Job("r0", runtime.session_id, prompt, 64, 0.0)], on_step=log)
        assert out["r0"] == target.greedy(prompt, 64)
        assert log.drafted_between(1, 4) > 0, "no drafts before the stall"
        assert log.drafted_between(18, len(log.drafted)) > 0, "drafts did not come back"
        # The stall costs at most MAX_MISSED_DEADLINES deadlines (+ the one in flight), then the
        # engine stops waiting for this device until it sends a draft again.
        stall_wait_s = (waited["end"] - waited["start"]) / 1e6
        assert stall_wait_s < (MAX_MISSED_DEADLINES + 1) * DEADLINE_S + 0.1, stall_wait_s
        assert hub.snapshot()["dropped_missing"] >= MAX_MISSED_DEADLINES
        wait_until(lambda: runtime.stats()["active_requests"] == 0, 5, "the device to drop r0")
        assert hub.snapshot()["requests_active"] == 0
    finally:
        release.set()
        runtime.stop()
        hub.close()


def test_device_process_killed_mid_request(models, tiny_pair, tmp_path, fast_idle_expiry):
    drafter, target = models
    hub = make_hub(drafter)
    device = DeviceProcess(hub.endpoint, tiny_pair.draft, tmp_path / "device.log")
    try:
        session = device.wait_session()
        engine = BatchEngine(hub, target, deadline_s=DEADLINE_S, step_s=STEP_S)
        log = StepLog(engine, {5: device.kill})
        jobs = [Job(f"k{i}", session, prompt_ids(drafter, i), 48, 0.0) for i in range(2)]
        out = engine.run(jobs, concurrency=2, on_step=log)
        for job in jobs:
            assert out[job.request_id] == target.greedy(job.prompt, 48), job.request_id
        assert log.drafted_between(1, 5) > 0, "the device drafted nothing before it was killed"
        assert device.proc.returncode == -9
        assert hub.snapshot()["requests_active"] == 0
        # No goodbye from a killed process: the session goes when it has been idle long enough.
        wait_until(lambda: hub.snapshot()["sessions_active"] == 0, 10, "the idle session to expire")
    finally:
        device.kill()
        hub.close()


def test_edge_restarted_while_the_agent_runs(models):
    """The hub goes away mid-request (the edge crashed) and comes back on the same port."""
    drafter, target = models
    port = free_port()
    hub = make_hub(drafter, port)
    runtime = make_runtime(drafter, f"tcp://127.0.0.1:{port}", reconnect_max_s=0.5)
    hubs = [hub]
    try:
        assert runtime.wait_session(10), runtime.failure
        first = runtime.session_id

        class EdgeCrashed(Exception):
            pass

        def crash() -> None:
            hub.close()
            raise EdgeCrashed

        engine = BatchEngine(hub, target, deadline_s=DEADLINE_S, step_s=STEP_S)
        with pytest.raises(EdgeCrashed):  # in-flight requests die with the edge, as in vLLM
            engine.run([Job("lost", first, prompt_ids(drafter, 1), 64, 0.0)],
                       on_step=StepLog(engine, {4: crash}))
        assert drafted_in(engine) > 0
        time.sleep(0.5)  # the edge is down for a while
        hubs.append(make_hub(drafter, port))
        wait_until(lambda: runtime.session_id not in ("", first), 15, "the agent to reconnect")
        assert runtime.client.counters["reconnects"] >= 1
        assert runtime.stats()["active_requests"] == 0  # the lost request's state was dropped
        engine = BatchEngine(hubs[1], target, deadline_s=DEADLINE_S, step_s=STEP_S)
        jobs = [Job(f"n{i}", runtime.session_id, prompt_ids(drafter, i), 32, 0.0)
                for i in range(3)]
        out = engine.run(jobs, concurrency=3)
        for job in jobs:
            assert out[job.request_id] == target.greedy(job.prompt, 32)
        assert drafted_in(engine) > 0, "no drafts after the edge restarted"
        assert hubs[1].snapshot()["requests_active"] == 0
    finally:
        runtime.stop()
        for h in hubs:
            h.close()


@pytest.mark.parametrize("long_partition", [False, True], ids=["short", "long"])
def test_network_partition(models, fast_idle_expiry, long_partition):
    """The link goes silent mid-request (nothing in either direction), then comes back.

    short: shorter than the agent's silence timeout: the same session resumes and the same
    request gets drafts again. long: the agent gives up on the silent link, handshakes again
    through the healed link, and later requests get drafts on the new session; the old session,
    abandoned without a goodbye, expires at the edge.
    """
    drafter, target = models
    hub = make_hub(drafter)
    port = int(hub.endpoint.rsplit(":", 1)[1])
    relay = PartitionRelay("127.0.0.1", port)
    silence = 0.3 if long_partition else 10.0
    runtime = make_runtime(drafter, relay.endpoint, silence_timeout_s=silence,
                           handshake_timeout_s=1.0, reconnect_max_s=0.5)
    try:
        assert runtime.wait_session(10), runtime.failure
        first = runtime.session_id
        engine = BatchEngine(hub, target, deadline_s=DEADLINE_S, step_s=STEP_S)
        heal_at = 50 if long_partition else 14
        log = StepLog(engine, {4: relay.partition, heal_at: relay.heal})
        prompt = prompt_ids(drafter, 2)
        out = engine.run([Job("p0", first, prompt, 72, 0.0)], on_step=log)
        relay.heal()  # (if p0 finished before heal_at)
        assert out["p0"] == target.greedy(prompt, 72)
        assert log.drafted_between(1, 4) > 0
        if not long_partition:
            assert runtime.session_id == first and runtime.client.counters["reconnects"] == 0
            assert log.drafted_between(heal_at + 2, len(log.drafted)) > 0, \
                "the request got no drafts after the partition healed"
        else:
            wait_until(lambda: runtime.session_id not in ("", first), 15, "a new session")
            engine = BatchEngine(hub, target, deadline_s=DEADLINE_S, step_s=STEP_S)
            prompt = prompt_ids(drafter, 3)
            out = engine.run([Job("p1", runtime.session_id, prompt, 32, 0.0)])
            assert out["p1"] == target.greedy(prompt, 32)
            assert drafted_in(engine) > 0, "no drafts on the new session"
            # The abandoned session expires; the device keeps (or renews) a live one.
            wait_until(lambda: not hub.has_session(first), 10, "the old session to go")
            wait_until(lambda: hub.has_session(runtime.session_id), 10, "a live session")
            assert hub.snapshot()["sessions_active"] == 1
        assert hub.snapshot()["requests_active"] == 0
        wait_until(lambda: runtime.stats()["active_requests"] == 0, 5, "the device to drop p0")
    finally:
        runtime.stop()
        relay.close()
        hub.close()


def test_idle_device_learns_that_its_session_expired(models, fast_idle_expiry):
    """Regression: the hub forgot idle sessions without telling the device, so a connected agent
    idle for SESSION_IDLE_TIMEOUT_S (300 s) kept a dead session id and never drafted again."""
    drafter, target = models
    hub = make_hub(drafter)
    runtime = make_runtime(drafter, hub.endpoint)
    try:
        assert runtime.wait_session(10), runtime.failure
        first = runtime.session_id
        wait_until(lambda: not hub.has_session(first), 10, "the idle session to expire")
        wait_until(lambda: hub.has_session(runtime.session_id), 5, "the device to handshake again")
        engine = BatchEngine(hub, target, deadline_s=DEADLINE_S, step_s=STEP_S)
        prompt = prompt_ids(drafter, 0)
        out = engine.run([Job("i0", runtime.session_id, prompt, 24, 0.0)])
        assert out["i0"] == target.greedy(prompt, 24)
        assert drafted_in(engine) > 0
    finally:
        runtime.stop()
        hub.close()


# ----------------------------------------------------------------------------------------------


def _edge_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Live bytes allocated by the edge's code (hub, guard, config) and the wire codec."""
    filters = [tracemalloc.Filter(True, "*/vllm_tslt/edge/*"),
               tracemalloc.Filter(True, "*/vllm_tslt/protocol/*")]
    return sum(s.size for s in snapshot.filter_traces(filters).statistics("filename"))


def test_edge_memory_returns_to_baseline(monkeypatch):
    """Rounds of devices that connect, serve requests and vanish (killed: no goodbye; or saying
    goodbye; or partitioned mid-request): afterwards the hub's tables are empty and the memory the
    edge's code holds is back near its baseline.

    Bound: live tracemalloc bytes allocated in vllm_tslt/edge and vllm_tslt/protocol grow by less
    than 64 KiB from after the first round to after the third (20 sessions, 200 requests and
    ~700 drafts in between: a leaked request record, with its prefix hasher, per request would
    exceed it; what does grow is the per-routing-id rate/strike table, ~200 B per new routing id,
    bounded at max_sessions + 1024 entries). The hub's tables must be exactly empty every round.
    """
    target = TableTarget(64, seed=3)
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=50),
                   vocab_size=64, vocab_fingerprint=FINGERPRINT, model_name="table",
                   max_gamma=4).start()
    monkeypatch.setattr(sessions_module, "SESSION_IDLE_TIMEOUT_S", 0.2)

    def expired() -> bool:
        hub.io.expire_idle_sessions()  # what the I/O thread's 5 s sweep calls: do not wait for it
        return hub.snapshot()["sessions_active"] == 0

    tracemalloc.start(1)
    try:
        measured = []
        for rnd in range(3):
            _device_round(hub, target, rnd)
            wait_until(expired, 5, "sessions to expire")
            snap = hub.snapshot()
            assert snap["requests_active"] == 0 and not hub.table.by_identity, snap
            measured.append(_edge_bytes(tracemalloc.take_snapshot()))
        growth = measured[-1] - measured[0]
        print(f"edge-attributed live bytes after each round: {measured} (growth {growth} B)")
        assert growth < 64 * 1024, measured
        assert hub.snapshot()["drafts_used"] > 400, str(hub.snapshot())
    finally:
        tracemalloc.stop()
        hub.close()


REQUESTS_PER_ROUND = 100


def _device_round(hub: DraftHub, target: TableTarget, rnd: int) -> None:
    port = int(hub.endpoint.rsplit(":", 1)[1])
    relay = PartitionRelay("127.0.0.1", port)
    # Honest devices drafting γ = 3 from the target itself (top-16, 12 bits).
    peers = [TableDevice(hub.endpoint if i < 8 else relay.endpoint, target, gamma=3, top_k=16,
                         seed=10 * rnd + i) for i in range(10)]
    try:
        for p in peers:
            p.start()
        jobs = [Job(f"m{rnd}-{i}", peers[i % 10].session_id, [i % 64, 7], 12, 1.0)
                for i in range(REQUESTS_PER_ROUND)]
        engine = BatchEngine(hub, target, deadline_s=0.2, seed=rnd, step_s=0.01)
        out = engine.run(jobs, concurrency=20, on_step=lambda step: relay.partition()
                         if step == 3 else None)
        assert len(out) == REQUESTS_PER_ROUND and all(len(v) == 12 for v in out.values())
        assert all(p.error is None for p in peers), [p.error for p in peers]
    finally:
        for i, p in enumerate(peers):
            p.stop(goodbye=i % 2 == 0)  # odd ones vanish without a goodbye
        relay.close()
