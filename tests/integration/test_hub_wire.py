"""The hub's newer channel features over loopback: Pause, EdgeStatus, wire formats (no vLLM)."""

from __future__ import annotations

import time

import pytest
import torch

from vllm_tslt.core.float_q import baseline_then_sample
from vllm_tslt.core.sparsify import SparsifyConfig
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    Commit,
    Draft,
    EdgeStatus,
    Error,
    Handshake,
    Pause,
    RequestStart,
    prefix_hash,
)
from vllm_tslt.testing.peers import (
    FINGERPRINT,
    VOCAB_SIZE,
    Peer,
    make_draft,
)

pytestmark = pytest.mark.integration


def _hub(**options) -> DraftHub:
    return DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", **options), vocab_size=VOCAB_SIZE,
                    vocab_fingerprint=FINGERPRINT, model_name="target", max_gamma=4).start()


@pytest.fixture()
def hub():
    h = _hub(draft_deadline_ms=500, wire_formats=["tslt", "tkslt"])
    yield h
    h.close()


def _start(hub, dev, sid, rid="r1", prompt=(1, 5, 9)) -> list[int]:
    assert hub.start_request(rid, sid, list(prompt), {"temperature": 1.0})
    assert isinstance(dev.recv(), RequestStart)
    hub.commit(rid, len(prompt) + 1, [7])
    assert isinstance(dev.recv(), Commit)
    return [*prompt, 7]


def test_pause_stops_the_wait_until_the_next_draft(hub):
    dev = Peer(hub.endpoint)
    sid = dev.handshake().session_id
    seq = _start(hub, dev, sid)
    t0 = time.monotonic()
    assert hub.collect(["r1"], deadline_s=0.5) == {}  # not paused: waits the deadline
    assert time.monotonic() - t0 >= 0.45
    dev.send(Pause(1))
    deadline = time.monotonic() + 2
    while hub.snapshot().get("pauses", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    assert hub.collect(["r1"], deadline_s=0.5) == {}
    assert time.monotonic() - t0 < 0.2  # paused: no wait
    dev.send(make_draft(1, seq))  # drafting again resumes waiting and uses the draft
    while hub.snapshot().get("drafts_received", 0) == 0 and time.monotonic() < deadline + 2:
        time.sleep(0.01)
    assert hub.collect(["r1"], deadline_s=2.0)["r1"].committed_len == len(seq)
    snap = hub.snapshot()
    assert snap["skipped_paused"] == 1 and snap["pauses"] == 1
    dev.close()


def test_a_paused_devices_commits_come_together_and_verified_stays_per_step(hub, monkeypatch):
    """Paused: commits within PAUSED_COMMIT_INTERVAL_S are held and told in one Commit; a step
    that verified drafts is told at once, after a separate verified-0 Commit of the held tokens
    (a sent-ahead draft can be used while paused), so `verified` always speaks of its own
    tokens."""
    from vllm_tslt.edge import sessions

    monkeypatch.setattr(sessions, "PAUSED_COMMIT_INTERVAL_S", 60.0)
    dev = Peer(hub.endpoint)
    sid = dev.handshake().session_id
    _start(hub, dev, sid)  # told [7]: length 4
    dev.send(Pause(1))
    deadline = time.monotonic() + 2
    while hub.snapshot().get("pauses", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    hub.commit("r1", 5, [8])  # held
    hub.commit("r1", 6, [9])  # held
    hub.commit("r1", 8, [10, 11], verified=2)  # told, after the held ones
    hub.commit("r1", 9, [12])  # held
    monkeypatch.setattr(sessions, "PAUSED_COMMIT_INTERVAL_S", 0.0)
    hub.commit("r1", 10, [13])  # the interval passed: told with the held one
    got = [dev.recv() for _ in range(3)]
    assert [(c.committed_len, c.new_tokens, c.verified) for c in got] == [
        (6, (8, 9), 0), (8, (10, 11), 2), (10, (12, 13), 0)], got
    assert hub.snapshot()["commits_held"] == 3
    assert not dev.sock.poll(100)  # nothing else was sent
    dev.close()


def test_status_reaches_sessions_with_running_requests(hub):
    busy, idle = Peer(hub.endpoint), Peer(hub.endpoint)
    sid = busy.handshake().session_id
    idle.handshake()
    _start(hub, busy, sid)
    hub.broadcast_status(EdgeStatus(4.5, 0.25, 1))
    assert busy.recv() == EdgeStatus(4.5, 0.25, 1)
    assert not idle.sock.poll(200)
    busy.close()
    idle.close()


def test_wire_formats_are_enforced_at_handshake_and_per_draft(hub):
    dev = Peer(hub.endpoint)
    refused = Peer(hub.endpoint)
    refused.send(Handshake(PROTOCOL_VERSION, VOCAB_SIZE, FINGERPRINT, "draft", ("wire:dsd-fp16",)))
    err = refused.recv()
    assert isinstance(err, Error) and err.code == "wire_format" and "wire_formats" in err.message
    reply = dev.handshake()
    assert {"wire:tslt", "wire:tkslt"} <= set(reply.capabilities)
    seq = _start(hub, dev, reply.session_id)
    tokens, q = baseline_then_sample(torch.randn(3, VOCAB_SIZE) * 3, SparsifyConfig(), "tkslt", 8,
                                     torch.rand(3, dtype=torch.float64))
    dev.send(Draft(1, len(seq), prefix_hash(seq), tokens, q))
    got = hub.collect(["r1"], deadline_s=2.0)["r1"]
    assert got.q.wire == "tkslt" and torch.equal(got.tokens, tokens)
    hub.commit("r1", len(seq) + 1, [3])
    dev.drain()
    seq = [*seq, 3]
    _, dense = baseline_then_sample(torch.randn(3, VOCAB_SIZE) * 3, SparsifyConfig(), "dsd-fp16", 1,
                                    torch.rand(3, dtype=torch.float64))
    dev.send(Draft(1, len(seq), prefix_hash(seq), tokens, dense))
    assert hub.collect(["r1"], deadline_s=0.3) == {}
    assert hub.snapshot()["invalid_wire_format"] == 1
    dev.close()
    refused.close()
