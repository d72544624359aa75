"""An emulated network link on the device's side of the draft channel (benchmarks, experiments).

``EmulatedLink`` holds every frame the device sends or receives as a real link would: each direction
is a FIFO with a rate (serialisation: a frame occupies the link for wire_bytes · 8 / rate seconds,
after the frames queued before it) and a one-way delay of rtt / 2. ``EdgeClient`` pushes frames in
(``send`` / ``arrive``) and hands over what is due (``due_up`` / ``due_down``).

Bytes on the wire (``wire_bytes``): the message plus ZMTP framing (9 bytes) and TCP/IPv4/Ethernet
headers (66 bytes per 1448-byte segment); ACKs and TCP's slow start are not modelled. Use it where
the kernel cannot shape traffic per process (``tc netem`` is not available on many hosts).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

ZMTP_FRAME_BYTES = 9
SEGMENT_PAYLOAD = 1448
SEGMENT_HEADERS = 66


def wire_bytes(num_bytes: int) -> int:
    framed = num_bytes + ZMTP_FRAME_BYTES
    return framed + SEGMENT_HEADERS * max(1, math.ceil(framed / SEGMENT_PAYLOAD))


@dataclass(frozen=True)
class LinkSpec:
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        for name in ("uplink_mbps", "downlink_mbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.rtt_ms < 60_000:
            raise ValueError(f"rtt_ms must be in [0, 60000), got {self.rtt_ms!r}")

    def label(self) -> str:
        return f"{self.uplink_mbps:g}/{self.downlink_mbps:g} Mbit/s, RTT {self.rtt_ms:g} ms"


class _Direction:
    def __init__(self, mbps: float, delay_s: float) -> None:
        self.bytes_per_s = mbps * 1e6 / 8
        self.delay_s = delay_s
        self.free_at = 0.0  # when the link finishes serialising what is queued
        self.queue: deque[tuple[float, bytes]] = deque()  # (delivery time, frame), FIFO
        self.wire_bytes = 0

    def push(self, data: bytes, now: float) -> None:
        size = wire_bytes(len(data))
        self.wire_bytes += size
        self.free_at = max(now, self.free_at) + size / self.bytes_per_s
        self.queue.append((self.free_at + self.delay_s, data))

    def pop_due(self, now: float) -> list[bytes]:
        out = []
        while self.queue and self.queue[0][0] <= now:
            out.append(self.queue.popleft()[1])
        return out

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class EmulatedLink:
    """Both directions of one device's link. Single-threaded (the client's loop)."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.up = _Direction(spec.uplink_mbps, spec.rtt_ms / 2e3)
        self.down = _Direction(spec.downlink_mbps, spec.rtt_ms / 2e3)

    def send(self, data: bytes, now: float) -> None:
        self.up.push(data, now)

    def arrive(self, data: bytes, now: float) -> None:
        self.down.push(data, now)

    def due_up(self, now: float) -> list[bytes]:
        return self.up.pop_due(now)

    def due_down(self, now: float) -> list[bytes]:
        return self.down.pop_due(now)

    def next_due(self) -> float | None:
        times = [t for t in (self.up.next_due(), self.down.next_due()) if t is not None]
        return min(times) if times else None

    def clear(self) -> None:
        """Drop what is in flight (the connection was reset)."""
        self.up.queue.clear()
        self.down.queue.clear()
