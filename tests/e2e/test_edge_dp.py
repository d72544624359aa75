"""End to end with `--data-parallel-size 2` (issue 15): one engine and one draft hub per DP rank.

Rank r's hub binds ``port + r``; a device handshaking with it learns the ``X-data-parallel-rank``
value that routes its requests to rank r. Two devices, one per rank, get drafts accepted on both
engines; a request sent to the other rank (its session unknown there) decodes without drafts and
stays exact. The API server's /metrics merges both hubs' counters (with `--api-server-count 1`:
vLLM's default of one API server per engine serves /metrics in prometheus multiprocess mode, which
leaves custom collectors out; patches/metrics.py logs that).
"""

from __future__ import annotations

import socket
import time

import pytest

from vllm_tslt.testing.devices import ModelDevice

from .server import free_port, metrics, vllm_server
from .test_edge_serve import _greedy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DEADLINE_MS = 3000
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
UNKNOWN = 'vllm_tslt_drafts_dropped_total{reason="requests_unknown_session"}'


def _two_free_ports() -> int:
    """A port p with p + 1 free too (rank 1's hub)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    port = _two_free_ports()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{port}",
            "draft_deadline_ms": DEADLINE_MS}
    log = tmp_path_factory.mktemp("edge_dp") / "vllm.log"
    with vllm_server(tiny_pair.target, log, spec,
                     extra_args=["--data-parallel-size", "2", "--api-server-count", "1"]) as url:
        yield {"url": url, "hubs": [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"],
               "log": log}



@pytest.fixture(scope="module")
def devices(edge, tiny_pair):
    devs = [ModelDevice(hub, tiny_pair.draft) for hub in edge["hubs"]]
    for dev in devs:
        assert dev.handshake().session_id
        dev.start()
    yield devs
    for dev in devs:
        dev.stop()



def _wait_for(url: str, key: str, minimum: float) -> None:
    """Until /metrics shows key >= minimum (the workers write their counters every 0.5 s)."""
    deadline = time.monotonic() + 5
    while (value := metrics(url).get(key, 0)) < minimum:
        assert time.monotonic() < deadline, f"{key} = {value}, expected >= {minimum}"
        time.sleep(0.5)


def _accepted(snapshot: dict[str, float], engine: int) -> float:
    return sum(v for k, v in snapshot.items()
               if k.startswith(ACCEPTED + "{") and f'engine="{engine}"' in k)


def _greedy_request(client, dev, prompt: str, route: int) -> str:
    model = client.models.list().data[0].id
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0,
        extra_body={"vllm_xargs": {"tslt_session": dev.session_id}},
        extra_headers={"X-data-parallel-rank": str(route)})
    return out.choices[0].text


def test_each_device_is_told_its_rank_and_drafts_are_accepted_on_both(edge, client, devices,
                                                                       reference):
    routes = [dev.reply.limits["data_parallel_rank"] for dev in devices]
    assert routes == [0, 1]
    before = metrics(edge["url"])
    prompts = ["def read_config(path):\n", "import os\n\n\nclass "]
    for dev, route in zip(devices, routes):
        for prompt in prompts:
            assert _greedy_request(client, dev, prompt, route) == _greedy(reference, prompt, 24)
    after = metrics(edge["url"])
    for engine in (0, 1):
        assert _accepted(after, engine) > _accepted(before, engine), f"no drafts on rank {engine}"
    # both hubs' counters reach /metrics (summed)
    bound = "vllm_tslt_requests_bound_total"
    _wait_for(edge["url"], bound, before.get(bound, 0) + 2 * len(prompts))
    _wait_for(edge["url"], "vllm_tslt_sessions_active", 2)


def test_misrouted_request_decodes_without_drafts_and_stays_exact(edge, client, devices,
                                                                  reference):
    dev0 = devices[0]  # its session lives in rank 0's hub; the request goes to rank 1
    before = metrics(edge["url"])
    prompt = "    for key, value in "
    assert _greedy_request(client, dev0, prompt, 1) == _greedy(reference, prompt, 24)
    _wait_for(edge["url"], UNKNOWN, before.get(UNKNOWN, 0) + 1)
