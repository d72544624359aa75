"""Fuzzing the hub's message handling: random and adversarial frames, through the handler and through
a real socket. The I/O thread must stay alive, keep serving a good device, keep its state bounded, and
drop wrong-length, replayed and stale drafts with the right counters."""

from __future__ import annotations

import random
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_tslt.edge import hub as hub_module
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import MAX_DRAFTS_PER_REQUEST, DraftHub
from vllm_tslt.protocol import (
    NO_HANDLE,
    PROTOCOL_VERSION,
    Commit,
    End,
    Handshake,
    MsgType,
    RequestStart,
    encode,
    prefix_hash,
)
from vllm_tslt.testing.peers import (
    FINGERPRINT,
    HELLO,
    VOCAB_SIZE,
    Peer,
    make_draft,
)

pytestmark = pytest.mark.integration
MAX_SESSIONS = 8


def start_hub(**options) -> DraftHub:
    config = TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=200, max_sessions=MAX_SESSIONS,
                        max_requests_per_session=4, **options)
    return DraftHub(config, vocab_size=VOCAB_SIZE, vocab_fingerprint=FINGERPRINT,
                    model_name="target", max_gamma=4).start()


class FakeRouter:
    def __init__(self) -> None:
        self.sent = 0

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent += 1


def assert_alive_and_bounded(hub: DraftHub) -> None:
    """The I/O thread runs, serves a fresh device, and every table is within its limit."""
    assert hub.io.thread is not None and hub.io.thread.is_alive()
    snap = hub.snapshot()
    assert snap.get("internal_errors", 0) == 0, snap
    assert len(hub.table.sessions) <= MAX_SESSIONS and len(hub.table.by_identity) <= MAX_SESSIONS
    assert len(hub.io.guards) <= MAX_SESSIONS + hub_module.PEER_TABLE_SLACK
    assert all(len(r.drafts) <= MAX_DRAFTS_PER_REQUEST for r in hub.table.requests.values())
    for session in list(hub.table.sessions.values()):  # make room for the probe device
        hub.table.close_session(session.session_id, "test")
    good = Peer(hub.endpoint)
    try:
        good.send(HELLO)
        reply = good.recv()
        assert isinstance(reply, Handshake) and hub.has_session(reply.session_id)
    finally:
        good.close()


VALID = [encode(m) for m in (HELLO, make_draft(1, [1, 2]), make_draft(1, [1, 2, 3]),
                             make_draft(2, [5], m=3), End(NO_HANDLE, "bye"), End(1, "x"),
                             Commit(1, 3, (3,)), RequestStart(1, "r", "s", (1,), {}))]
MUTATION = st.tuples(st.sampled_from(["flip", "truncate", "extend"]), st.integers(0, 10**4),
                     st.binary(min_size=1, max_size=16))


@st.composite
def device_message(draw) -> tuple[list[bytes], str]:
    identity = draw(st.sampled_from([b"dev-%d" % i for i in range(12)] + [b"\x00ab", b"x" * 255]))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        data = draw(st.binary(max_size=300))
    elif kind == 1:
        data = VALID[draw(st.integers(0, len(VALID) - 1))]
    elif kind == 2:
        data = bytearray(VALID[draw(st.integers(0, len(VALID) - 1))])
        for op, pos, blob in draw(st.lists(MUTATION, min_size=1, max_size=3)):
            pos %= max(len(data), 1)
            if op == "flip" and data:
                data[pos] ^= 1 << (blob[0] % 8)
            elif op == "truncate":
                del data[pos:]
            else:
                data += blob
        data = bytes(data)
    else:  # a well-formed frame with fields of the wrong type or value
        fields = draw(st.lists(st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(),
                                         st.text(max_size=8), st.binary(max_size=16)), max_size=9))
        msg_type = draw(st.sampled_from([int(t) for t in MsgType]))
        data = msgpack.packb([PROTOCOL_VERSION, msg_type, *fields], use_bin_type=True)
    frames = [identity, data, *draw(st.sampled_from([[], [], [], [], [b""], [b"extra"]]))]
    peer = draw(st.sampled_from(["", "", "K" * 40, "L" * 40]))  # as if CURVE keys were in play
    return frames, peer


def test_random_frames_through_the_handler_keep_the_hub_sound():
    hub = start_hub(max_messages_per_s=500)
    router = FakeRouter()
    hub.io.on_frames(router, [b"dev-0", encode(HELLO)])
    sid = next(iter(hub.table.sessions))
    assert hub.start_request("r-bound", sid, [1, 2], {})

    @settings(max_examples=600, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(device_message(), min_size=1, max_size=8))
    def run(messages) -> None:
        for frames, peer in messages:
            hub.io.on_frames_guarded(router, frames, peer)
        assert hub.snapshot().get("internal_errors", 0) == 0

    try:
        run()
        snap = hub.snapshot()
        assert snap.get("invalid_malformed", 0) > 0 and snap.get("sessions_opened", 0) > 1
        assert_alive_and_bounded(hub)
    finally:
        hub.close()


def test_random_bytes_over_the_socket_do_not_stop_the_hub():
    hub = start_hub()
    rng = random.Random(0)
    devices = [Peer(hub.endpoint, identity=b"fuzz-%d" % i) for i in range(4)]
    try:
        for n in range(800):
            dev = devices[n % len(devices)]
            base = rng.choice(VALID)
            data = bytearray(base if rng.random() < 0.7 else rng.randbytes(rng.randrange(200)))
            for _ in range(rng.randint(0, 3)):
                if data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            parts = [bytes(data)] + [rng.randbytes(3)] * (n % 17 == 0)  # now and then multipart
            dev.sock.send_multipart(parts)
        deadline, before = time.monotonic() + 10.0, -1
        while time.monotonic() < deadline:  # until the hub has taken everything in (stable)
            now = hub.snapshot().get("uplink_bytes", 0)
            if now == before and now > 0:
                break
            before = now
            time.sleep(0.2)
        snap = hub.snapshot()
        assert snap.get("invalid_framing", 0) > 0 and snap.get("invalid_malformed", 0) > 0
        assert_alive_and_bounded(hub)
    finally:
        for dev in devices:
            dev.close()
        hub.close()


def test_the_codec_bug_frame_does_not_stop_the_hub():
    """A DRAFT with kw=0 and an empty payload (test_fuzz_codec's known bug) must not kill the I/O
    thread: the hub counts it (internal_errors until the codec is fixed, then bad_bitstream)."""
    hub = start_hub()
    dev = Peer(hub.endpoint)
    try:
        dev.send(HELLO)
        assert isinstance(dev.recv(), Handshake)
        dev.sock.send(msgpack.packb([PROTOCOL_VERSION, int(MsgType.DRAFT), 1, 1, 2, 1, 1, 4, 0,
                                     1, 1, b"\x01"], use_bin_type=True))
        dev.send(HELLO)  # the same device is still served afterwards
        reply = dev.recv()
        while not isinstance(reply, Handshake):
            reply = dev.recv()
        snap = hub.snapshot()
        assert snap.get("internal_errors", 0) + snap.get("invalid_bad_bitstream", 0) == 1
        assert hub.io.thread.is_alive()
    finally:
        dev.close()
        hub.close()


def test_wrong_length_replayed_and_stale_drafts_are_dropped_and_counted():
    hub = start_hub()
    dev = Peer(hub.endpoint)
    try:
        dev.send(HELLO)
        sid = dev.recv().session_id
        assert hub.start_request("r1", sid, [1, 2], {})
        assert isinstance(dev.recv(), RequestStart)
        hub.commit("r1", 3, [7])
        seq = [1, 2, 7]
        dev.send(make_draft(1, [1, 2]))  # conditioned on a shorter sequence: late
        dev.send(make_draft(1, [*seq, 9, 9, 9]))  # wrong (longer) committed length
        dev.send(make_draft(1, seq, prefix=prefix_hash(seq) ^ 1))  # right length, wrong prefix
        time.sleep(0.2)
        assert hub.collect(["r1"], deadline_s=0.1) == {}
        snap = hub.snapshot()
        assert snap["dropped_late"] == 1 and snap["dropped_stale"] == 1
        good = make_draft(1, seq, seed=5)
        dev.send(good)
        used = hub.collect(["r1"], deadline_s=2.0)["r1"]
        assert torch.equal(used.tokens, good.tokens)
        hub.commit("r1", 5, [8, 4])
        dev.send(good)  # replayed after the commit: late, never used again
        for n in range(3 * MAX_DRAFTS_PER_REQUEST):  # drafts for many future lengths: bounded
            dev.send(make_draft(1, [*seq, 8, 4, *range(n + 1)]))
        time.sleep(0.3)
        assert hub.collect(["r1"], deadline_s=0.1) == {}
        snap = hub.snapshot()
        assert snap["dropped_late"] == 2 and snap["drafts_used"] == 1
        assert len(hub.table.requests["r1"].drafts) <= MAX_DRAFTS_PER_REQUEST
        hub.end_request("r1", "finished")
        assert hub.snapshot()["requests_active"] == 0
    finally:
        dev.close()
        hub.close()
