"""The agent's DEALER session over loopback: handshake, refusal, reconnects (no vLLM)."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from vllm_tslt.agent.client import EdgeClient, HandshakeRefused
from vllm_tslt.core.sparsify import SparseQ
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    DecodeLimits,
    Draft,
    Error,
    Handshake,
    RequestStart,
    decode,
    encode,
)

pytestmark = pytest.mark.integration
V, FP = 64, "a" * 32
LIMITS = DecodeLimits(vocab_size=V)
HELLO = Handshake(PROTOCOL_VERSION, V, FP, "draft")


def make_hub(bind: str = "tcp://127.0.0.1:0", fingerprint: str = FP) -> DraftHub:
    return DraftHub(TsltConfig(bind=bind), vocab_size=V, vocab_fingerprint=fingerprint,
                    model_name="target", max_gamma=4).start()


def make_client(endpoint: str, **kw) -> EdgeClient:
    opts = {"handshake_timeout_s": 1.0, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.4,
            "silence_timeout_s": 5.0, **kw}
    return EdgeClient(endpoint, HELLO, LIMITS, **opts)


def pump(client: EdgeClient, until, timeout_s: float = 5.0, sink: list | None = None) -> None:
    """Drive the client's loop until ``until()`` or the deadline; messages go to ``sink``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        client.step()
        got = client.poll(0.01)
        if sink is not None:
            sink += got
        if until():
            return
    raise AssertionError(f"condition not met within {timeout_s} s (state {client.state})")


def tiny_draft(handle: int) -> Draft:
    q = SparseQ(torch.tensor([[3]], dtype=torch.int32), torch.tensor([[4096]], dtype=torch.int32), 12)
    return Draft(handle, 2, 0, torch.tensor([3]), q)


def test_handshake_binds_a_request_and_says_goodbye():
    hub = make_hub()
    client = make_client(hub.endpoint)
    try:
        pump(client, lambda: client.ready)
        assert client.session_id and hub.has_session(client.session_id)
        assert client.edge_limits["max_gamma"] == 4
        assert hub.start_request("r1", client.session_id, [1, 2], {"temperature": 0.0})
        msgs: list = []
        pump(client, lambda: bool(msgs), sink=msgs)
        assert isinstance(msgs[0], RequestStart) and msgs[0].prompt_ids == (1, 2)
        session = client.session_id
        client.close()  # End("") lets the hub free the session at once
        deadline = time.monotonic() + 3
        while hub.has_session(session) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not hub.has_session(session)
    finally:
        client.close()
        hub.close()


def test_vocab_mismatch_is_refused_with_the_reason():
    hub = make_hub(fingerprint="b" * 32)
    client = make_client(hub.endpoint)
    try:
        with pytest.raises(HandshakeRefused, match="vocab_mismatch") as info:
            pump(client, lambda: False)
        assert info.value.code == "vocab_mismatch" and "tokenizer" in str(info.value)
        assert not client.session_id
    finally:
        client.close()
        hub.close()


def test_reconnects_when_the_edge_restarts_on_the_same_port():
    hub = make_hub()
    endpoint = hub.endpoint
    client = make_client(endpoint)
    try:
        pump(client, lambda: client.ready)
        first, epoch = client.session_id, client.epoch
        hub.close()
        pump(client, lambda: not client.ready)  # the monitor saw the connection drop
        time.sleep(0.3)  # the edge is down for a while: the client backs off meanwhile
        hub = make_hub(bind=endpoint)
        pump(client, lambda: client.ready)
        assert client.session_id != first and client.epoch == epoch + 1
        assert hub.has_session(client.session_id)
        assert client.stats()["reconnects"] == 1
    finally:
        client.close()
        hub.close()


class MiniRouter:
    """A scripted edge: answers handshakes, then does what the test says."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.handshakes = 0
        self.answer_drafts_with: Error | None = None

    def serve(self, timeout_ms: int = 10) -> None:
        while self.sock.poll(timeout_ms):
            identity, data = self.sock.recv_multipart()
            msg = decode(data, LIMITS)
            if isinstance(msg, Handshake):
                self.handshakes += 1
                reply = Handshake(PROTOCOL_VERSION, V, FP, "target", (), {"max_gamma": 4},
                                  f"s{self.handshakes}")
                self.sock.send_multipart([identity, encode(reply)])
            elif self.answer_drafts_with is not None:
                self.sock.send_multipart([identity, encode(self.answer_drafts_with)])

    def close(self) -> None:
        self.sock.close(linger=0)


def _pump_with(router: MiniRouter, client: EdgeClient, until, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        router.serve(0)
        client.step()
        client.poll(0.01)
        if until():
            return
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_unknown_peer_and_silence_trigger_a_new_handshake():
    router = MiniRouter()
    client = make_client(router.endpoint, silence_timeout_s=0.3)
    try:
        _pump_with(router, client, lambda: client.session_id == "s1")
        router.answer_drafts_with = Error("unknown_peer", "handshake first")
        assert client.send(tiny_draft(1))
        _pump_with(router, client, lambda: client.session_id == "s2")
        router.answer_drafts_with = None  # now the edge goes silent
        assert client.send(tiny_draft(1))
        t0 = time.monotonic()
        _pump_with(router, client, lambda: client.session_id == "s3")
        assert time.monotonic() - t0 >= 0.3
    finally:
        client.close()
        router.close()


def test_no_edge_means_backoff_and_no_session():
    router = MiniRouter()
    endpoint = router.endpoint
    router.close()  # nothing listens there
    client = make_client(endpoint, handshake_timeout_s=0.1, reconnect_max_s=0.2)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.8:
            client.step()
            client.poll(0.01)
        assert not client.ready and client.send(tiny_draft(1)) == 0
        assert client._backoff == 0.2  # doubled up to reconnect_max_s
    finally:
        client.close()
