"""The draft hub over loopback ZeroMQ with a scripted device (no vLLM)."""

from __future__ import annotations

import time

import pytest

from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import (
    Commit,
    End,
    Error,
    Handshake,
    RequestStart,
)
from vllm_tslt.testing.peers import (
    FINGERPRINT,
    VOCAB_SIZE,
    Peer,
    make_draft,
)

pytestmark = pytest.mark.integration


@pytest.fixture()
def session(hub):
    """A device that completed its handshake: (device, session id). Closed after the test."""
    dev = Peer(hub.endpoint)
    yield dev, dev.handshake().session_id
    dev.close()


@pytest.fixture()
def hub():
    h = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=200),
                 vocab_size=VOCAB_SIZE, vocab_fingerprint=FINGERPRINT, model_name="target",
                 max_gamma=4).start()
    yield h
    h.close()


def test_handshake_assigns_unguessable_sessions(hub):
    a, b = Peer(hub.endpoint), Peer(hub.endpoint)
    try:
        ha, hb = a.handshake(), b.handshake()
        assert isinstance(ha, Handshake) and isinstance(hb, Handshake)
        assert ha.session_id != hb.session_id and len(ha.session_id) >= 24
        assert ha.limits["max_gamma"] == 4 and "multi_candidate" in ha.capabilities
        assert hub.has_session(ha.session_id) and hub.snapshot()["sessions_active"] == 2
    finally:
        a.close()
        b.close()


def test_vocab_mismatch_is_refused_with_the_reason(hub):
    dev = Peer(hub.endpoint)
    try:
        reply = dev.handshake(fingerprint="0" * 32)
        assert isinstance(reply, Error) and reply.code == "vocab_mismatch"
        assert "tokenizer" in reply.message
        assert hub.snapshot()["sessions_active"] == 0
    finally:
        dev.close()


def test_request_commit_draft_collect_end(hub, session):
    dev, sid = session
    prompt = [1, 5, 9]
    assert hub.start_request("r1", sid, prompt, {"temperature": 1.0})
    start = dev.recv()
    assert isinstance(start, RequestStart) and start.prompt_ids == tuple(prompt)
    hub.commit("r1", 4, [7])
    assert dev.recv() == Commit(1, 4, (7,))
    seq = [*prompt, 7]
    dev.send(make_draft(1, seq))
    drafts = hub.collect(["r1"], deadline_s=2.0)
    assert drafts["r1"].committed_len == 4 and drafts["r1"].gamma == 3
    hub.end_request("r1", "finished")
    assert dev.recv() == End(1, "finished")
    snap = hub.snapshot()
    assert snap["drafts_used"] == 1 and snap["requests_active"] == 0
    assert snap["uplink_bytes"] > 0 and snap["downlink_bytes"] > 0


def test_missing_stale_and_unbound_drafts_are_dropped_and_counted(hub, session):
    dev, sid = session
    hub.start_request("r1", sid, [1, 2], {})
    dev.recv()
    t0 = time.monotonic()
    assert hub.collect(["r1"], deadline_s=0.15) == {}  # nothing sent: missing
    assert 0.14 <= time.monotonic() - t0 < 1.0
    dev.send(make_draft(1, [1, 3]))  # right length, wrong prefix: stale
    time.sleep(0.1)
    assert hub.collect(["r1"], deadline_s=0.1) == {}
    dev.send(make_draft(99, [1, 2]))  # not this device's request
    time.sleep(0.1)
    snap = hub.snapshot()
    assert snap["dropped_missing"] == 1 and snap["dropped_stale"] == 1
    assert snap["dropped_unknown_request"] == 1
    assert hub.collect(["unbound"], deadline_s=1.0) == {}  # not bound: no wait at all


def test_garbage_and_unknown_peers_do_not_stop_the_hub(hub):
    good, bad = Peer(hub.endpoint), Peer(hub.endpoint)
    try:
        bad.sock.send(b"\x00garbage\xff" * 10)
        assert isinstance(bad.recv(), Error)
        bad.send(make_draft(1, [1]))  # valid format, but no handshake
        reply = bad.recv()
        assert isinstance(reply, Error) and reply.code == "unknown_peer"
        sid = good.handshake().session_id
        assert hub.start_request("r9", sid, [4], {})
        assert isinstance(good.recv(), RequestStart)
        snap = hub.snapshot()
        assert snap["invalid_malformed"] >= 1 and snap["invalid_unknown_peer"] == 1
    finally:
        good.close()
        bad.close()


def test_a_silent_device_costs_at_most_a_few_deadlines(hub, session):
    from vllm_tslt.edge.hub import MAX_MISSED_DEADLINES

    dev, sid = session
    hub.start_request("r1", sid, [1, 2], {})
    dev.recv()
    t0 = time.monotonic()
    for _ in range(MAX_MISSED_DEADLINES):
        assert hub.collect(["r1"], deadline_s=0.1) == {}
    assert time.monotonic() - t0 >= 0.1 * MAX_MISSED_DEADLINES - 0.01
    t1 = time.monotonic()
    assert hub.collect(["r1"], deadline_s=0.5) == {}  # unresponsive: no wait
    assert time.monotonic() - t1 < 0.05
    dev.send(make_draft(1, [1, 2]))  # it speaks again: waited for again
    time.sleep(0.1)
    assert "r1" in hub.collect(["r1"], deadline_s=0.5)


def test_same_tokenizer_with_a_narrower_draft_vocabulary_is_accepted(hub):
    """Checkpoints of one family pad their vocabularies differently; the tokenizer decides."""
    from vllm_tslt.protocol import PROTOCOL_VERSION, Handshake

    narrow, wide = Peer(hub.endpoint), Peer(hub.endpoint)
    try:
        narrow.send(Handshake(PROTOCOL_VERSION, VOCAB_SIZE - 8, FINGERPRINT, "draft"))
        assert isinstance(narrow.recv(), Handshake)
        wide.send(Handshake(PROTOCOL_VERSION, VOCAB_SIZE + 8, FINGERPRINT, "draft"))
        reply = wide.recv()
        assert getattr(reply, "code", "") == "vocab_mismatch"
    finally:
        narrow.close()
        wide.close()
