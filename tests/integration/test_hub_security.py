"""Hub security over loopback: CURVE authentication, peer binding, rate limit, abuse, memory bounds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from vllm_tslt.agent.client import EdgeClient
from vllm_tslt.edge import hub as hub_module
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import ABUSE_MAX_STRIKES, DraftHub
from vllm_tslt.edge.keys_cli import register_cli, write_keypair
from vllm_tslt.protocol import (
    NO_HANDLE,
    DecodeLimits,
    End,
    Error,
    Handshake,
    decode,
    encode,
)
from vllm_tslt.testing.peers import (
    FINGERPRINT,
    HELLO,
    LIMITS,
    VOCAB_SIZE,
    Peer,
    make_draft,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Keypairs: the edge, two authorized devices and one stranger."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("edge", "alice", "bob", "mallory"):
        out[name], out[f"{name}_secret"] = write_keypair(root / "all", name)
    allowed = root / "authorized"
    allowed.mkdir()
    for name in ("alice", "bob"):
        (allowed / f"{name}.key").write_bytes(out[name].read_bytes())
    out["authorized"] = allowed
    return out


def make_hub(**options) -> DraftHub:
    config = TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=200, **options)
    return DraftHub(config, vocab_size=VOCAB_SIZE, vocab_fingerprint=FINGERPRINT,
                    model_name="target", max_gamma=4).start()


class CurveDevice(Peer):
    def __init__(self, endpoint: str, ctx: zmq.Context, secret_file: Path | None,
                 server_file: Path) -> None:
        self.secret_file, self.server_file = secret_file, server_file
        super().__init__(endpoint, ctx=ctx)

    def configure(self, sock: zmq.Socket) -> None:
        if self.secret_file is not None:
            public, secret = zmq.auth.load_certificate(self.secret_file)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = zmq.auth.load_certificate(self.server_file)[0]

    def silent(self, timeout_ms: int = 500) -> bool:
        return not self.sock.poll(timeout_ms)


@pytest.fixture()
def curve_hub(keys):
    hub = make_hub(curve_secret_key_file=str(keys["edge_secret"]),
                   curve_authorized_keys_dir=str(keys["authorized"]))
    ctx = zmq.Context()
    devices: list[Peer] = []

    def connect(name: str | None) -> CurveDevice:
        secret = keys[f"{name}_secret"] if name else None
        devices.append(CurveDevice(hub.endpoint, ctx, secret, keys["edge"]))
        return devices[-1]

    yield hub, connect
    for dev in devices:
        dev.close()
    ctx.term()
    hub.close()


def test_curve_admits_authorized_keys_only(curve_hub):
    hub, connect = curve_hub
    alice, mallory, plain = connect("alice"), connect("mallory"), connect(None)
    for dev in (mallory, plain):
        dev.send(HELLO)
    reply = alice.handshake()
    assert isinstance(reply, Handshake) and len(reply.session_id) >= 24
    assert mallory.silent() and plain.silent(), "ZeroMQ must drop unauthenticated peers"
    snap = hub.snapshot()
    assert snap["sessions_active"] == 1 and snap["sessions_opened"] == 1
    assert snap["uplink_bytes"] == len(encode(HELLO))  # nothing of theirs reached the hub


def test_curve_agent_client_connects_and_reports_refusal(curve_hub, keys):
    hub, _ = curve_hub
    clients = {name: EdgeClient(hub.endpoint, HELLO, LIMITS, handshake_timeout_s=1.0,
                                curve_secret_key_file=str(keys[f"{name}_secret"]),
                                curve_server_key_file=str(keys["edge"]))
               for name in ("bob", "mallory")}
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not (
                clients["bob"].ready and clients["mallory"].counters["auth_failures"]):
            for client in clients.values():
                client.step()
                client.poll(0.02)
        assert clients["bob"].ready and hub.has_session(clients["bob"].session_id)
        assert not clients["mallory"].ready and clients["mallory"].counters["auth_failures"] >= 1
    finally:
        for client in clients.values():
            client.close()


def test_a_device_cannot_draft_for_another_keys_request(curve_hub):
    """Handles name requests within the sender's own session: bob's handle 1 is not alice's."""
    hub, connect = curve_hub
    alice, bob = connect("alice"), connect("bob")
    sid_a, sid_b = alice.handshake().session_id, bob.handshake().session_id
    assert hub.start_request("r-alice", sid_a, [1, 2], {})
    assert alice.recv().handle == 1
    bob.send(make_draft(1, [1, 2]))  # alice's handle, from bob's session
    time.sleep(0.2)
    assert hub.collect(["r-alice"], deadline_s=0.1) == {}
    snap = hub.snapshot()
    assert snap["dropped_unknown_request"] == 1 and snap.get("drafts_used", 0) == 0
    assert hub.has_session(sid_a) and hub.has_session(sid_b)
    alice.send(make_draft(1, [1, 2]))  # the owner's own draft still works
    assert "r-alice" in hub.collect(["r-alice"], deadline_s=2.0)


def test_a_session_is_bound_to_the_key_that_opened_it():
    """Without sockets: the same routing id with another key is not that session (and ends it)."""
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0"), vocab_size=VOCAB_SIZE,
                   vocab_fingerprint=FINGERPRINT, model_name="target", max_gamma=4)
    router = FakeRouter()
    hub.io.on_frames(router, [b"id-1", encode(HELLO)], "KEY-A" * 8)
    sid = decode(router.sent[-1][1], LIMITS).session_id
    hub.io.on_frames(router, [b"id-1", encode(make_draft(1, [1]))], "KEY-B" * 8)
    snap = hub.snapshot()
    assert snap["invalid_wrong_peer"] == 1 and not hub.has_session(sid)
    assert decode(router.sent[-1][1], LIMITS).code == "unknown_peer"


class FakeRouter:
    """Collects the hub's direct replies (`io.on_frames` driven without the I/O thread)."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent.append(frames)
        del self.sent[:-100]  # bounded: the tests read only the latest replies


def test_rate_limit_drops_and_repeated_abuse_closes_the_session():
    hub = make_hub(max_messages_per_s=20)
    dev = Peer(hub.endpoint)
    try:
        sid = dev.handshake().session_id
        draft = encode(make_draft(99, [1]))
        for _ in range(20 + ABUSE_MAX_STRIKES + 10):  # far above 20 messages per second
            dev.sock.send(draft)
        reply = dev.recv()
        assert isinstance(reply, Error) and reply.code == "session_closed"
        snap = hub.snapshot()
        assert snap["dropped_rate_limited"] > ABUSE_MAX_STRIKES
        assert snap["sessions_closed_abuse"] == 1 and not hub.has_session(sid)
        time.sleep(0.2)  # the bucket refills: the peer may handshake again
        assert isinstance(dev.handshake(), Handshake)
    finally:
        dev.close()
        hub.close()


def test_garbage_flood_closes_the_session_but_not_others():
    hub = make_hub()
    bad, good = Peer(hub.endpoint), Peer(hub.endpoint)
    try:
        sid_bad, sid_good = bad.handshake().session_id, good.handshake().session_id
        for _ in range(ABUSE_MAX_STRIKES + 1):
            bad.sock.send(b"\xc1not msgpack")
        replies = [bad.recv() for _ in range(ABUSE_MAX_STRIKES + 1)]
        assert replies[-1].code == "session_closed"
        assert all(r.code == "malformed" for r in replies[:-1])
        assert not hub.has_session(sid_bad) and hub.has_session(sid_good)
        assert hub.snapshot()["sessions_closed_abuse"] == 1
        bad.send(make_draft(1, [1]))
        assert bad.recv().code == "unknown_peer"  # must handshake again
    finally:
        bad.close()
        good.close()
        hub.close()


def test_thousands_of_sessions_and_requests_stay_bounded_and_shrink_back():
    max_sessions, per_session = 500, 8
    hub = make_hub(max_sessions=max_sessions, max_requests_per_session=per_session)
    router = FakeRouter()
    try:
        hello = encode(HELLO)
        sids = []
        for i in range(2000):
            hub.io.on_frames(router, [b"dev-%d" % i, hello])
            reply = decode(router.sent[-1][1], LIMITS)
            if isinstance(reply, Handshake):
                sids.append(reply.session_id)
        snap = hub.snapshot()
        assert len(sids) == max_sessions == snap["sessions_active"]
        assert snap["handshake_refused_too_many_sessions"] == 2000 - max_sessions
        rids = [f"{sid}-{j}" for sid in sids for j in range(per_session + 2)]
        bound = [rid for rid in rids if hub.start_request(rid, rid.rsplit("-", 1)[0], [1, 2], {})]
        assert len(bound) == max_sessions * per_session == hub.snapshot()["requests_active"]
        assert hub.snapshot()["requests_over_session_limit"] == 2 * max_sessions
        assert len(hub.io.guards) <= max_sessions + hub_module.PEER_TABLE_SLACK
        assert len(hub.table.by_identity) == len(hub.table.sessions) == max_sessions
        for rid in bound:
            hub.end_request(rid, "finished")
        for i in range(2000):  # every device says goodbye (End without a request id)
            hub.io.on_frames(router, [b"dev-%d" % i, encode(End(NO_HANDLE, "bye"))])
        snap = hub.snapshot()
        assert snap["requests_active"] == 0 and snap["sessions_active"] == 0
        assert not hub.table.by_identity and not hub.table.requests
    finally:
        hub.close()


def test_keys_cli_writes_a_loadable_keypair_and_refuses_to_overwrite(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="vllm-tslt")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", "--out", str(tmp_path / "k"), "--name", "edge"])
    assert args.func(args) == 0
    public, secret = zmq.auth.load_certificate(tmp_path / "k" / "edge.key_secret")
    assert secret is not None and zmq.auth.load_certificate(tmp_path / "k" / "edge.key")[0] == public
    assert (tmp_path / "k" / "edge.key_secret").stat().st_mode & 0o077 == 0
    assert args.func(args) == 2 and "refusing to overwrite" in capsys.readouterr().out
    bad = parser.parse_args(["keys", "--out", str(tmp_path), "--name", "../x"])
    assert bad.func(bad) == 2


def test_decode_limits_come_from_the_config():
    hub = DraftHub(TsltConfig(max_k=8, max_candidates=2, max_payload_bytes=4096),
                   vocab_size=VOCAB_SIZE, vocab_fingerprint=FINGERPRINT, model_name="target",
                   max_gamma=3)
    assert hub.limits == DecodeLimits(vocab_size=VOCAB_SIZE, max_k=8, max_gamma=3,
                                      max_candidates=2, max_payload_bytes=4096,
                                      max_prompt_len=1 << 20)
