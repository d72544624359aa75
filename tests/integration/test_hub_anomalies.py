"""Every hub call the engine step makes is total (issue 17, part 4): an internal anomaly is counted
under ``anomaly_<what>``, the request concerned is unbound (its device told ``End``) and decodes
plainly; nothing raises into the engine. Each test provokes one anomaly over loopback."""

from __future__ import annotations

import time

import pytest
import zmq

from vllm_tslt.edge.hub import ANOMALY_END_REASON, DraftHub
from vllm_tslt.protocol import Commit, EdgeStatus, End, RequestStart
from vllm_tslt.testing.peers import Peer, make_draft, make_hub

pytestmark = pytest.mark.integration


@pytest.fixture()
def hub():
    h = make_hub(draft_deadline_ms=200)
    yield h
    h.close()


@pytest.fixture()
def device(hub):
    """A device with a session and request "r1" (prompt [1, 2]) bound to it."""
    dev = Peer(hub.endpoint)
    sid = dev.handshake().session_id
    assert hub.start_request("r1", sid, [1, 2], {})
    assert isinstance(dev.recv(), RequestStart)
    yield dev, sid
    dev.close()


def assert_unbound(hub: DraftHub, dev: Peer, request_id: str, handle: int = 1) -> None:
    """The request is gone from the hub, its device was told (by the request's handle), and it
    decodes plainly."""
    end = dev.recv()
    assert isinstance(end, End) and end.handle == handle, end
    assert end.reason == ANOMALY_END_REASON
    assert not hub.table.is_bound(request_id)
    t0 = time.monotonic()
    assert hub.collect([request_id], deadline_s=5.0) == {}  # nothing to wait for
    assert time.monotonic() - t0 < 1.0
    hub.commit(request_id, 99, [1])  # later calls for it are no-ops, not anomalies
    hub.end_request(request_id, "finished")


def anomalies(hub: DraftHub) -> dict[str, int]:
    return {k: v for k, v in hub.snapshot().items() if k.startswith("anomaly_")}


def test_commit_with_a_length_that_does_not_add_up(hub, device):
    dev, _ = device
    hub.commit("r1", 5, [3])  # 2 + 1 != 5: the engine and the hub disagree
    assert anomalies(hub) == {"anomaly_commit_length": 1}
    assert_unbound(hub, dev, "r1")


def test_commit_with_tokens_that_cannot_be_hashed(hub, device):
    dev, _ = device
    hub.commit("r1", 3, ["not a token"])
    assert anomalies(hub) == {"anomaly_commit_failed": 1}
    assert_unbound(hub, dev, "r1")


def test_a_request_started_twice_is_rebound_to_the_new_prompt(hub, device):
    dev, sid = device
    assert hub.start_request("r1", sid, [4, 5, 6], {})
    assert anomalies(hub) == {"anomaly_start_rebound": 1}
    end = dev.recv()
    assert isinstance(end, End) and end.reason == ANOMALY_END_REASON
    start = dev.recv()
    assert isinstance(start, RequestStart) and start.prompt_ids == (4, 5, 6)
    assert start.handle == 2  # a new binding, a new handle: drafts for the old one are void
    dev.send(make_draft(1, [4, 5, 6]))
    time.sleep(0.2)
    assert hub.collect(["r1"], deadline_s=0.1) == {}
    dev.send(make_draft(2, [4, 5, 6]))
    assert "r1" in hub.collect(["r1"], deadline_s=2.0)
    assert hub.snapshot()["requests_active"] == 1


def test_start_request_whose_prompt_message_cannot_be_encoded(hub, device):
    dev, sid = device
    # A seed past 64 bits cannot be packed: the request runs, unbound, without drafts.
    assert hub.start_request("r2", sid, [1], {"seed": 1 << 70}) is False
    assert anomalies(hub) == {"anomaly_start_request_failed": 1}
    assert not hub.table.is_bound("r2") and hub.table.is_bound("r1")
    end = dev.recv()  # never the RequestStart: at most an End it can ignore
    assert isinstance(end, End) and end.handle == 2, end  # r2 got handle 2 in this session


def test_end_request_whose_send_fails(hub, device, monkeypatch):
    def broken_send(identity, msg):
        raise zmq.ZMQError(zmq.ETERM)

    monkeypatch.setattr(hub.io, "send", broken_send)
    hub.end_request("r1", "finished")
    assert anomalies(hub) == {"anomaly_end_request_failed": 1}
    assert not hub.table.is_bound("r1") and hub.snapshot()["requests_active"] == 0


def test_collect_with_a_deadline_that_is_not_a_number(hub, device):
    dev, _ = device
    for bad in (float("inf"), float("nan")):
        t0 = time.monotonic()
        assert hub.collect(["r1"], bad) == {}
        assert time.monotonic() - t0 < 1.0
    assert anomalies(hub) == {"anomaly_collect_deadline": 2}
    dev.send(make_draft(1, [1, 2]))  # the request itself is fine
    assert "r1" in hub.collect(["r1"], deadline_s=2.0)


def test_collect_with_request_ids_that_are_not_iterable(hub, device):
    assert hub.collect(None, 0.1) == {}
    assert anomalies(hub) == {"anomaly_collect_failed": 1}


def test_broadcast_status_whose_send_fails(hub, device, monkeypatch):
    monkeypatch.setattr(hub.io, "send", lambda identity, msg: 1 / 0)
    hub.broadcast_status(EdgeStatus(3.0, 0.1, 1))
    assert anomalies(hub) == {"anomaly_broadcast_status_failed": 1}
    assert hub.table.is_bound("r1")  # a status is no request's: nothing unbound


def test_count_with_a_name_that_cannot_be_a_key(hub):
    hub.count(["not", "hashable"])
    assert anomalies(hub) == {"anomaly_count_failed": 1}


@pytest.mark.parametrize("call, args, table_method, fallback", [
    ("start_request", ("r9", "sid", [1], {}), "bind", False),
    ("commit", ("r1", 3, [3]), "advance", None),
    ("end_request", ("r1", "finished"), "unbind", None),
    ("collect", (["r1"], 0.1), "collect", {}),
    ("broadcast_status", (EdgeStatus(3.0, 0.1, 1),), "identities_with_requests", None),
])
def test_no_engine_step_call_raises_whatever_breaks_inside(hub, device, monkeypatch, call, args,
                                                           table_method, fallback):
    def broken(*a, **k):
        raise RuntimeError(f"{table_method} is broken")

    monkeypatch.setattr(hub.table, table_method, broken)
    assert getattr(hub, call)(*args) == fallback
    monkeypatch.undo()
    assert hub.snapshot()[f"anomaly_{call}_failed"] == 1


def test_requests_of_other_devices_keep_their_drafts(hub, device):
    other = Peer(hub.endpoint)
    try:
        other_sid = other.handshake().session_id
        assert hub.start_request("r2", other_sid, [7], {})
        assert isinstance(other.recv(), RequestStart)
        hub.commit("r1", 7, [3])  # r1's anomaly
        hub.commit("r2", 2, [8])
        assert isinstance(other.recv(), Commit)
        other.send(make_draft(1, [7, 8]))  # handles count per session: r2 is the other's 1
        drafts = hub.collect(["r1", "r2"], deadline_s=2.0)
        assert list(drafts) == ["r2"]
        assert anomalies(hub) == {"anomaly_commit_length": 1}
    finally:
        other.close()


def test_anomalies_reach_the_metrics_by_kind(hub, device, tmp_path):
    from vllm_tslt.edge.stats import HubMetricsCollector, StatsWriter

    hub.commit("r1", 9, [3])
    path = tmp_path / "stats.json"
    StatsWriter(hub, str(path)).write_once()
    families = {f.name: f for f in HubMetricsCollector(path).collect()}
    samples = families["vllm_tslt_engine_anomalies"].samples
    assert [(s.labels, s.value) for s in samples] == [({"kind": "commit_length"}, 1.0)]
