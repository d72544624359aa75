"""End to end with `speculative_config.verifier = "fused"`: vllm_tslt's sparse rejection sampler in
vLLM's place (no dense q), multi-candidate drafts (m = 2) included."""

from __future__ import annotations

import pytest

from vllm_tslt.testing.devices import ModelDevice

from . import test_edge_serve as common
from .server import free_port, metrics, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{hub_port}",
            "draft_deadline_ms": common.DEADLINE_MS, "verifier": "fused",
            "wire_formats": ["tslt", "dsd-fp16", "tkslt"]}
    log = tmp_path_factory.mktemp("edge-fused") / "vllm.log"
    with vllm_server(tiny_pair.target, log, spec) as url:
        yield {"url": url, "hub": f"tcp://127.0.0.1:{hub_port}", "log": log}




@pytest.fixture()
def device(edge, tiny_pair):
    dev = ModelDevice(edge["hub"], tiny_pair.draft, candidates=2).start_after_handshake()
    yield dev
    dev.stop()


def test_fused_greedy_equals_target_greedy(edge, client, device, reference):
    common.test_greedy_with_remote_drafts_equals_target_greedy(edge, client, device, reference)
    assert "sparse_rejection_sample uses the torch path" in edge["log"].read_text()


def test_fused_multi_candidate_samples_follow_the_target(edge, client, device, reference,
                                                         tiny_pair):
    before = metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"]
    common.test_temperature_one_samples_follow_the_target(edge, client, device, reference,
                                                          tiny_pair)
    assert metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"] > before


@pytest.mark.parametrize("wire", ["dsd-fp16", "tkslt"])
def test_baseline_wire_formats_through_the_fused_verifier(edge, tiny_pair, reference, wire):
    common.agent_with_wire_format_matches_target_greedy(edge, tiny_pair, reference, wire)
