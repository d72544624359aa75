"""Scripted device peers for the reliability tests: a DEALER socket in a thread, speaking the codec.

``ScriptedPeer`` handshakes, tracks the committed sequence of every request bound to it and calls
``on_context(request_id)`` once per request whose sequence started or advanced since the last time
it drained its socket (older contexts are skipped, as a real device does); subclasses draft there.
``stop()`` joins the thread and closes the socket (no goodbye: the edge sees a vanished device)
unless ``goodbye=True``.
"""

from __future__ import annotations

import threading
from collections import Counter

import zmq

from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    Commit,
    DecodeLimits,
    Draft,
    End,
    Handshake,
    RequestStart,
    decode,
    encode,
)

FINGERPRINT = "f" * 32


class ScriptedPeer:
    def __init__(self, endpoint: str, vocab_size: int, name: str = "peer") -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.limits = DecodeLimits(vocab_size=vocab_size)
        self.vocab_size = vocab_size
        self.name = name
        self.session_id = ""
        self.seqs: dict[str, list[int]] = {}
        self.params: dict[str, dict] = {}
        self.sent: Counter[str] = Counter()
        self.lock = threading.Lock()  # guards seqs for readers in other threads
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"peer-{name}", daemon=True)

    def handshake(self, timeout_ms: int = 5000) -> str:
        self.sock.send(encode(Handshake(PROTOCOL_VERSION, self.vocab_size, FINGERPRINT,
                                        self.name)))
        assert self.sock.poll(timeout_ms), f"{self.name}: no handshake reply"
        reply = decode(self.sock.recv(), self.limits)
        assert isinstance(reply, Handshake) and reply.session_id, reply
        self.session_id = reply.session_id
        return self.session_id

    def start(self) -> ScriptedPeer:
        self.handshake()
        self._thread.start()
        return self

    def stop(self, goodbye: bool = False) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if goodbye:
            self.sock.send(encode(End("", "bye")))
        self.sock.close(linger=0)
        assert not self._thread.is_alive(), f"{self.name}: thread did not stop"

    def send(self, draft: Draft, kind: str) -> None:
        self.sock.send(encode(draft))
        self.sent[kind] += 1

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

    def _on_message(self, msg, changed: dict[str, None]) -> None:
        if isinstance(msg, RequestStart):
            with self.lock:
                self.seqs[msg.request_id] = list(msg.prompt_ids)
            self.params[msg.request_id] = msg.sampling_params
            changed[msg.request_id] = None
        elif isinstance(msg, Commit) and msg.request_id in self.seqs:
            with self.lock:
                seq = self.seqs[msg.request_id]
                seq.extend(msg.new_tokens)
                assert len(seq) == msg.committed_len, (self.name, msg)
            changed[msg.request_id] = None
        elif isinstance(msg, End):
            with self.lock:
                self.seqs.pop(msg.request_id, None)
            self.params.pop(msg.request_id, None)
            self.on_end(msg.request_id)

    def snapshot(self) -> dict[str, list[int]]:
        with self.lock:
            return {rid: list(seq) for rid, seq in self.seqs.items()}

    # hooks ----------------------------------------------------------------------------------

    def on_context(self, request_id: str) -> None:
        pass

    def on_end(self, request_id: str) -> None:
        pass

    def tick(self) -> None:
        pass
