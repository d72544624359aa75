"""The emulated link: serialisation at the link rate, FIFO order, one-way delay."""

from __future__ import annotations

import pytest

from vllm_tslt.agent.link import EmulatedLink, LinkSpec, wire_bytes

pytestmark = pytest.mark.unit


def test_rate_delay_and_order() -> None:
    link = EmulatedLink(LinkSpec(uplink_mbps=1.0, downlink_mbps=100.0, rtt_ms=20.0))
    big, small = b"x" * 12_500, b"y" * 10
    link.send(big, now=0.0)
    link.send(small, now=0.0)
    t_big = wire_bytes(len(big)) * 8 / 1e6 + 0.010  # serialised at 1 Mbit/s, then 10 ms one way
    assert link.due_up(t_big - 1e-6) == []
    assert link.due_up(t_big) == [big]
    t_small = t_big + wire_bytes(len(small)) * 8 / 1e6  # waits behind the big frame
    assert link.next_due() == pytest.approx(t_small)
    assert link.due_up(t_small) == [small]
    link.arrive(b"z" * 100, now=1.0)
    assert link.due_down(1.0 + 0.0099) == []
    assert link.due_down(1.0 + 0.0101 + wire_bytes(100) * 8 / 100e6) == [b"z" * 100]
    assert link.next_due() is None


def test_wire_bytes_counts_headers_per_segment() -> None:
    assert wire_bytes(0) == 9 + 66
    assert wire_bytes(1448 - 9) == 1448 + 66
    assert wire_bytes(1448 - 8) == 1449 + 2 * 66


def test_idle_link_does_not_bank_capacity() -> None:
    link = EmulatedLink(LinkSpec(8.0, 8.0, 0.0))  # 1 byte per microsecond
    link.send(b"a" * 925, now=100.0)  # 1000 wire bytes: 1 ms, starting at 100.0
    assert link.next_due() == pytest.approx(100.001)


@pytest.mark.parametrize("bad", [dict(uplink_mbps=0, downlink_mbps=1, rtt_ms=1),
                                 dict(uplink_mbps=1, downlink_mbps=1, rtt_ms=-1)])
def test_spec_is_validated(bad) -> None:
    with pytest.raises(ValueError):
        LinkSpec(**bad)
