"""The device side of the draft hub's wire, scripted: ZeroMQ DEALER sockets speaking the codec.

- ``Peer``: one socket, driven synchronously by the test (send, recv with a deadline, handshake).
- ``ScriptedPeer``: a ``Peer`` in its own thread. It handshakes, tracks the committed sequence of
  every request bound to it and calls ``on_context(request_id)`` once per request whose sequence
  started or advanced since it last drained its socket (older contexts are skipped, as a real device
  does); subclasses draft there (vllm_tslt.testing.devices). ``stop()`` joins the thread and
  closes the socket (no goodbye: the edge sees a vanished device) unless ``goodbye=True``.
- ``make_draft``: a valid draft for a sequence, from random logits; ``make_hub``: a hub for them.

Defaults (``VOCAB_SIZE``, ``FINGERPRINT``, ``HELLO``, ``LIMITS``) match a hub built for tests with
``vocab_size=VOCAB_SIZE, vocab_fingerprint=FINGERPRINT``.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import torch
import zmq

from vllm_tslt.core.sparsify import SparsifyConfig, sparsify_then_sample
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    Commit,
    DecodeLimits,
    Draft,
    End,
    Error,
    Handshake,
    RequestStart,
    decode,
    encode,
    prefix_hash,
)

VOCAB_SIZE = 64
FINGERPRINT = "f" * 32
HELLO = Handshake(PROTOCOL_VERSION, VOCAB_SIZE, FINGERPRINT, "draft")
LIMITS = DecodeLimits(vocab_size=VOCAB_SIZE)


class Peer:
    """One device socket, driven by the caller."""

    def __init__(self, endpoint: str, vocab_size: int = VOCAB_SIZE, name: str = "draft", *,
                 fingerprint: str = FINGERPRINT, identity: bytes | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.configure(self.sock)
        self.sock.connect(endpoint)
        self.vocab_size = vocab_size
        self.name = name
        self.fingerprint = fingerprint
        self.limits = DecodeLimits(vocab_size=vocab_size)
        self.session_id = ""
        self.reply: Handshake | Error | None = None  # the edge's answer to the last handshake
        self.sent: Counter[str] = Counter()  # messages sent, by the kind the caller named

    def configure(self, sock: zmq.Socket) -> None:
        """Socket options to set before connecting (e.g. CURVE keys); none by default."""

    def send(self, msg: Any, kind: str = "") -> None:
        self.send_bytes(encode(msg), kind)

    def send_bytes(self, data: bytes, kind: str = "") -> None:
        self.sock.send(data)
        if kind:
            self.sent[kind] += 1

    def recv(self, timeout_ms: int = 2000) -> Any:
        assert self.sock.poll(timeout_ms), f"{self.name}: no message from the hub before the deadline"
        return decode(self.sock.recv(), self.limits)

    def drain(self) -> None:
        while self.sock.poll(50):
            self.sock.recv()

    def handshake(self, fingerprint: str | None = None, timeout_ms: int = 10_000
                  ) -> Handshake | Error:
        """Open a session (sets session_id on success); returns the edge's reply."""
        self.send(Handshake(PROTOCOL_VERSION, self.vocab_size, fingerprint or self.fingerprint,
                            self.name))
        self.reply = self.recv(timeout_ms)
        if isinstance(self.reply, Handshake):
            self.session_id = self.reply.session_id
        return self.reply

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)


class ScriptedPeer(Peer):
    """A device in a thread: tracks its requests' committed sequences, drafts in the hooks."""

    def __init__(self, endpoint: str, vocab_size: int = VOCAB_SIZE, name: str = "peer",
                 **options: Any) -> None:
        super().__init__(endpoint, vocab_size, name, **options)
        self.seqs: dict[str, list[int]] = {}
        self.params: dict[str, dict] = {}
        self.lock = threading.Lock()  # guards seqs for readers in other threads
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"peer-{name}", daemon=True)

    def start(self) -> ScriptedPeer:
        """Handshake (unless done already) and start the thread."""
        if not self.session_id:
            reply = self.handshake()
            assert isinstance(reply, Handshake) and reply.session_id, f"{self.name}: {reply}"
        self._thread.start()
        return self

    def stop(self, goodbye: bool = False) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)
        if goodbye:
            self.send(End(0, "bye"))
        self.close(linger_ms=200 if goodbye else 0)  # let the goodbye leave
        assert not self._thread.is_alive(), f"{self.name}: thread did not stop"

    def snapshot(self) -> dict[str, list[int]]:
        with self.lock:
            return {rid: list(seq) for rid, seq in self.seqs.items()}

    def context(self, request_id: str) -> list[int]:
        """A copy of the request's committed sequence (for drafting from another thread)."""
        with self.lock:
            return list(self.seqs[request_id])

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.tick()
                if not self.sock.poll(5):
                    continue
                changed: dict[str, None] = {}  # drain first, then draft once per request
                while True:
                    try:
                        data = self.sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(decode(data, self.limits), changed)
                for rid in changed:
                    if rid in self.seqs:
                        self.on_context(rid)
        except BaseException as e:  # surfaced by the test (a silent peer would look like a stall)
            self.error = e
            raise

    def _on_message(self, msg: Any, changed: dict[str, None]) -> None:
        if isinstance(msg, RequestStart):
            with self.lock:
                self.seqs[msg.handle] = list(msg.prompt_ids)
            self.params[msg.handle] = msg.sampling_params
            changed[msg.handle] = None
        elif isinstance(msg, Commit) and msg.handle in self.seqs:
            with self.lock:
                seq = self.seqs[msg.handle]
                seq.extend(msg.new_tokens)
                assert len(seq) == msg.committed_len, (self.name, msg)
            changed[msg.handle] = None
        elif isinstance(msg, End):
            with self.lock:
                self.seqs.pop(msg.handle, None)
            self.params.pop(msg.handle, None)
            self.on_end(msg.handle)

    # hooks ----------------------------------------------------------------------------------

    def on_context(self, request_id: str) -> None:
        """The request's committed sequence started or advanced: draft for it here."""

    def on_end(self, request_id: str) -> None:
        """The edge ended the request."""

    def tick(self) -> None:
        """Called every loop turn (about every 5 ms), messages or not."""


def make_draft(handle: int, sequence: list[int], gamma: int = 3, seed: int = 0,
               prefix: int | None = None, m: int = 1, vocab_size: int = VOCAB_SIZE) -> Draft:
    """A valid draft for `sequence` (γ rows, top-8 q̃ at 8 bits, m candidates per position)."""
    g = torch.Generator().manual_seed(seed)
    cands, q = sparsify_then_sample(torch.randn(gamma, vocab_size, generator=g) * 3,
                                    SparsifyConfig(top_k=8, quant_bits=8),
                                    torch.rand(gamma, m, dtype=torch.float64, generator=g))
    return Draft(handle, len(sequence), prefix_hash(sequence) if prefix is None else prefix,
                 cands[:, 0].clone(), q, cands[:, 1:].clone() if m > 1 else None)


def make_hub(*, start: bool = True, max_gamma: int = 4, **config: Any) -> DraftHub:
    """A draft hub on a free loopback port for the default peers (VOCAB_SIZE, FINGERPRINT);
    `config` are TsltConfig fields."""
    hub = DraftHub(TsltConfig(**{"bind": "tcp://127.0.0.1:0", **config}), vocab_size=VOCAB_SIZE,
                   vocab_fingerprint=FINGERPRINT, model_name="target", max_gamma=max_gamma)
    return hub.start() if start else hub
