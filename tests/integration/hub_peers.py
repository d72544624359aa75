"""Scripted device peers for the draft-hub tests (plain DEALER sockets speaking the codec)."""

from __future__ import annotations

import torch
import zmq

from vllm_tslt.core.sparsify import SparsifyConfig, sparsify_then_sample
from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    DecodeLimits,
    Draft,
    Error,
    Handshake,
    decode,
    encode,
    prefix_hash,
)

V, FP = 64, "f" * 32
LIMITS = DecodeLimits(vocab_size=V)
HELLO = Handshake(PROTOCOL_VERSION, V, FP, "draft")


class Device:
    def __init__(self, endpoint: str, identity: bytes | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(endpoint)

    def send(self, msg) -> None:
        self.sock.send(encode(msg))

    def recv(self, timeout_ms: int = 2000):
        assert self.sock.poll(timeout_ms), "no message from the hub before the deadline"
        return decode(self.sock.recv(), LIMITS)

    def drain(self) -> None:
        while self.sock.poll(50):
            self.sock.recv()

    def handshake(self, fingerprint: str = FP) -> Handshake | Error:
        self.send(Handshake(PROTOCOL_VERSION, V, fingerprint, "draft"))
        return self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


def make_draft(request_id: str, sequence: list[int], gamma: int = 3, seed: int = 0,
               prefix: int | None = None, m: int = 1) -> Draft:
    """A valid draft for `sequence` (γ rows, top-8 q̃ at 8 bits, m candidates per position)."""
    g = torch.Generator().manual_seed(seed)
    cands, q = sparsify_then_sample(torch.randn(gamma, V, generator=g) * 3,
                                    SparsifyConfig(top_k=8, quant_bits=8),
                                    torch.rand(gamma, m, dtype=torch.float64, generator=g))
    return Draft(request_id, len(sequence), prefix_hash(sequence) if prefix is None else prefix,
                 cands[:, 0].clone(), q, cands[:, 1:].clone() if m > 1 else None)
