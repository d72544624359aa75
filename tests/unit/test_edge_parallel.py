"""The edge under TP / DP / PP (vllm_tslt/edge/parallel.py) without a distributed engine: a fake TP
group stands in for vLLM's GroupCoordinator and records every collective each rank makes."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest
import torch

from vllm_tslt.edge.config import TsltConfig, TsltConfigError
from vllm_tslt.edge.parallel import (
    EdgeParallel,
    InertHub,
    omp_threads_bind,
    rank_bind,
    rank_stats_path,
    refuse_pipeline_parallel,
    route_rank,
    served_data_parallel_ranks,
)

pytestmark = pytest.mark.unit


class FakeTpGroup:
    """Rank 0's broadcast value is what every receiving rank gets; each call is recorded."""

    def __init__(self, rank: int, from_rank0=None) -> None:
        self.rank_in_group = rank
        self.from_rank0 = from_rank0
        self.calls: list[tuple] = []

    def broadcast_object(self, obj=None, src=0):
        self.calls.append(("broadcast", src, obj))
        return obj if self.rank_in_group == src else self.from_rank0


def test_pipeline_parallel_is_refused_naming_the_alternatives():
    refuse_pipeline_parallel(1)
    with pytest.raises(TsltConfigError, match=r"--pipeline-parallel-size 2.*--tensor-parallel-size"):
        refuse_pipeline_parallel(2)
    config = NS(parallel_config=NS(pipeline_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(TsltConfigError, match="pipeline"):
        EdgeParallel.from_vllm_config(config, TsltConfig())


def test_rank_bind_and_stats_paths_per_data_parallel_rank(tmp_path):
    assert rank_bind("tcp://0.0.0.0:5557", 0) == "tcp://0.0.0.0:5557"
    assert rank_bind("tcp://0.0.0.0:5557", 3) == "tcp://0.0.0.0:5560"
    assert rank_bind("tcp://127.0.0.1:0", 2) == "tcp://127.0.0.1:0"  # any free port
    assert rank_bind("ipc:///tmp/hub", 1) == "ipc:///tmp/hub-dp1"
    explicit = {"bind": "tcp://h:1", "stats_path": str(tmp_path / "s.json")}
    assert rank_stats_path(explicit, 0) == tmp_path / "s.json"
    assert rank_stats_path(explicit, 2) == tmp_path / "s.dp2.json"
    default = {"bind": "tcp://h:1", "stats_path": ""}
    assert rank_stats_path(default, 0) != rank_stats_path(default, 1)
    config = TsltConfig(bind="tcp://127.0.0.1:7000")
    rank1 = EdgeParallel(data_parallel_index=1).rank_config(config, config.to_dict())
    assert rank1.bind == "tcp://127.0.0.1:7001"
    assert rank1.stats_path == str(rank_stats_path(config.to_dict(), 1))
    assert EdgeParallel().rank_config(config, config.to_dict()) is config


def test_served_ranks_and_route_header_per_load_balancing_mode():
    assert served_data_parallel_ranks(NS(data_parallel_size=1)) == range(1)
    internal = NS(data_parallel_size=4, data_parallel_rank=0, data_parallel_external_lb=False,
                  data_parallel_hybrid_lb=False, data_parallel_size_local=4)
    assert served_data_parallel_ranks(internal) == range(4)
    hybrid = NS(data_parallel_size=4, data_parallel_rank=2, data_parallel_external_lb=False,
                data_parallel_hybrid_lb=True, data_parallel_size_local=2)
    assert served_data_parallel_ranks(hybrid) == range(2, 4)
    external = NS(data_parallel_size=4, data_parallel_rank=3, data_parallel_external_lb=True,
                  data_parallel_hybrid_lb=False)
    assert served_data_parallel_ranks(external) == range(3, 4)
    # worker side (after vLLM reconfigured a dense model's DP rank as independent)
    worker = dict(data_parallel_size=1, data_parallel_external_lb=False,
                  data_parallel_hybrid_lb=False)
    assert route_rank(NS(**worker, data_parallel_rank_local=0, data_parallel_index=0), 1) is None
    assert route_rank(NS(**worker, data_parallel_rank_local=1, data_parallel_index=3), 4) == 3
    assert route_rank(NS(**{**worker, "data_parallel_hybrid_lb": True},
                         data_parallel_rank_local=1, data_parallel_index=3), 4) == 1
    assert route_rank(NS(**{**worker, "data_parallel_external_lb": True},
                         data_parallel_rank_local=0, data_parallel_index=3), 4) is None
    engine = NS(additional_config={"tslt_data_parallel_size": 2},
                parallel_config=NS(**worker, data_parallel_rank_local=0, data_parallel_index=0))
    assert EdgeParallel.from_vllm_config(engine, TsltConfig()).route == 0
    assert EdgeParallel(route=2).handshake_limits() == {"data_parallel_rank": 2}
    assert EdgeParallel().handshake_limits() == {}


def test_share_from_rank0_is_a_collective_on_every_rank_even_when_rank0_fails():
    errors = []
    rows = (torch.tensor([[1, 2]]), None)
    rank0 = EdgeParallel(tp_rank=0, tp_size=2, _group=FakeTpGroup(0))
    assert rank0.share_from_rank0(lambda: rows, errors.append) is rows
    rank1 = EdgeParallel(tp_rank=1, tp_size=2, _group=FakeTpGroup(1, from_rank0=rows))
    assert rank1.share_from_rank0(lambda: pytest.fail("rank 1 must not build"),
                                  errors.append) is rows

    def broken():
        raise RuntimeError("boom")

    assert rank0.share_from_rank0(broken, errors.append) is None  # broadcast None, not skipped
    assert [c[2] for c in rank0._group.calls] == [rows, None]
    assert len(rank1._group.calls) == 1 and str(errors[0]) == "boom"
    solo = EdgeParallel()
    assert solo.share_from_rank0(broken, errors.append) is None and len(errors) == 2


def test_check_sampled_is_off_by_default_and_with_one_rank():
    assert EdgeParallel(tp_size=2, _group=FakeTpGroup(0)).check_sampled([[1]]) is None
    assert EdgeParallel(tp_check=True).check_sampled([[1]]) is None


def test_inert_hub_answers_every_engine_step_call():
    hub = InertHub()
    assert hub.start_request("r", "s", [1], {}) is False
    assert hub.collect(["r"], 1.0) == {}
    for call in (hub.commit, hub.end_request, hub.broadcast_status, hub.count, hub.close):
        assert call("r") is None


def test_omp_threads_bind_only_where_auto_binding_fails():
    assert omp_threads_bind(2, [0, 1], numa_nodes=1) == "0|1"
    assert omp_threads_bind(2, range(8), numa_nodes=1) == "0,1,2,3|4,5,6,7"
    assert omp_threads_bind(3, range(8), numa_nodes=1) == "0,1,2|3,4,5|6,7"
    assert omp_threads_bind(4, [0, 1], numa_nodes=1) == "0|1|0|1"
    assert omp_threads_bind(2, range(8), numa_nodes=2) is None  # vLLM's auto works
    assert omp_threads_bind(1, [0, 1], numa_nodes=1) is None


def test_serve_sets_a_binding_when_absent_and_says_so(monkeypatch, caplog):
    from vllm_tslt import serve

    assert serve.local_cpu_workers(["m", "--tensor-parallel-size", "2"]) == 2
    assert serve.local_cpu_workers(["m", "-tp=2", "-dp", "2"]) == 4
    assert serve.local_cpu_workers(["m", "-dp", "4", "--data-parallel-size-local", "2"]) == 2
    monkeypatch.setattr(serve, "_is_cpu_build", lambda: True)
    monkeypatch.setattr("vllm_tslt.edge.parallel.numa_node_count", lambda: 1)
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with caplog.at_level("WARNING", logger="vllm_tslt.serve"):
        assert serve.default_cpu_threads_bind(["m", "--tensor-parallel-size", "2"]) == "0|1"
    assert serve.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "VLLM_CPU_OMP_THREADS_BIND='0|1'" in caplog.text
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the operator's choice wins
    assert serve.default_cpu_threads_bind(["m", "-tp", "2"]) is None
    assert serve.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_metrics_merge_the_hubs_of_every_served_rank(tmp_path):
    from vllm_tslt.edge.stats import HubMetricsCollector

    paths = [tmp_path / "a.json", tmp_path / "b.json", tmp_path / "missing.json"]
    paths[0].write_text(json.dumps({"drafts_used": 3, "sessions_active": 1, "endpoint": "x",
                                    "requests_unknown_session": 1}))
    paths[1].write_text(json.dumps({"drafts_used": 4, "sessions_active": 2}))
    collector = HubMetricsCollector(*paths)
    assert collector.read() == {"drafts_used": 7, "sessions_active": 3,
                                "requests_unknown_session": 1}
    families = {f.name: f for f in collector.collect()}
    assert families["vllm_tslt_drafts_used"].samples[0].value == 7


def test_tp_check_option():
    assert TsltConfig.from_dict({"tp_check": "true"}).tp_check is True
    assert TsltConfig().tp_check is False
    with pytest.raises(TsltConfigError, match="tp_check"):
        TsltConfig(tp_check=1)  # type: ignore[arg-type]


# --- the proposer on a TP rank other than 0 -----------------------------------------------------


def _tp_proposer(monkeypatch, rank: int, group: FakeTpGroup, tmp_path, tp_check: bool = False):
    import vllm.distributed.parallel_state as parallel_state

    from vllm_tslt.edge import proposer as proposer_module

    monkeypatch.setattr(parallel_state, "get_tp_group", lambda: group)
    monkeypatch.setattr(proposer_module, "_tokenizer_fingerprint", lambda _: "f" * 32)
    config = NS(
        additional_config={"tslt": {"bind": "tcp://127.0.0.1:0", "tp_check": tp_check,
                                    "stats_path": str(tmp_path / "stats.json")}},
        parallel_config=NS(tensor_parallel_size=2, pipeline_parallel_size=1),
        speculative_config=NS(num_speculative_tokens=4),
        model_config=NS(get_vocab_size=lambda: 64, served_model_name=None, model="m",
                        tokenizer="unused", trust_remote_code=False))
    return proposer_module.TsltProposer(config)


def test_rank_1_is_inert_and_verifies_with_rank_0s_rows(monkeypatch, tmp_path):
    from vllm_tslt.core.sparsify import SparseQ

    # rank 0's rows for 2 scheduled tokens: q̃ = 1/2 on the drafted token and 1/2 on token 63
    rows = (SparseQ(torch.tensor([[3, 63], [5, 63]], dtype=torch.int32),
                    torch.full((2, 2), 2048, dtype=torch.int32), 12), None)
    group = FakeTpGroup(1, from_rank0=rows)
    prop = _tp_proposer(monkeypatch, 1, group, tmp_path)
    assert isinstance(prop.hub, InertHub) and prop.stats is None
    metadata = NS(draft_token_ids=torch.tensor([3, 5], dtype=torch.int32), num_draft_tokens=[2])
    dense = prop.draft_probs(["r"], metadata, torch.device("cpu"))
    assert float(dense[0, 3]) == 0.5 and float(dense[1, 63]) == 0.5
    assert group.calls == [("broadcast", 0, None)]  # received, built nothing itself
    # the tp_check negative control: only with the test switches on and the request asking
    params = NS(extra_args={"tslt_test_tp_perturb": True})
    prop._runner = NS(requests={"r": NS(sampling_params=params)})
    assert float(prop.draft_probs(["r"], metadata, torch.device("cpu"))[0, 3]) == 0.5
    monkeypatch.setenv("VLLM_TSLT_TEST_SWITCHES", "1")
    assert float(prop.draft_probs(["r"], metadata, torch.device("cpu"))[0, 3]) == 1.0
    assert len(group.calls) == 3  # the broadcast was still received every step


def test_rank_0_broadcasts_one_hot_fallback_when_building_rows_fails(monkeypatch, tmp_path):
    group = FakeTpGroup(0)
    prop = _tp_proposer(monkeypatch, 0, group, tmp_path)
    try:
        assert prop.hub.endpoint  # rank 0 owns the hub

        def broken(*args):
            raise RuntimeError("boom")

        monkeypatch.setattr(prop, "_gather", broken)
        metadata = NS(draft_token_ids=torch.tensor([7], dtype=torch.int32), num_draft_tokens=[1])
        dense = prop.draft_probs(["r"], metadata, torch.device("cpu"))
        assert float(dense[0, 7]) == 1.0 and float(dense.sum()) == 1.0
        assert group.calls == [("broadcast", 0, None)]
        assert prop.hub.snapshot()["anomaly_draft_probs_failed"] == 1
    finally:
        prop.stats.close()
        prop.hub.close()


def test_tp_check_counts_a_divergent_step_on_rank_0(monkeypatch, tmp_path):
    group = FakeTpGroup(0)
    prop = _tp_proposer(monkeypatch, 0, group, tmp_path, tp_check=True)
    try:
        gathered = {"ranks": None}

        def all_gather_object(out, obj, group=None):
            out[:] = gathered["ranks"]

        group.cpu_group = object()
        monkeypatch.setattr("torch.distributed.all_gather_object", all_gather_object)
        gathered["ranks"] = [[[1, 2]], [[1, 2]]]
        prop.check_sampled(torch.tensor([[1, 2]]))
        assert prop.hub.snapshot().get("tp_divergent_steps", 0) == 0
        gathered["ranks"] = [[[1, 2]], [[1, 9]]]
        prop.check_sampled(torch.tensor([[1, 2]]))
        assert prop.hub.snapshot()["tp_divergent_steps"] == 1
    finally:
        prop.stats.close()
        prop.hub.close()


def test_multiprocess_metrics_mode_is_reported(tmp_path, monkeypatch, caplog):
    """With several API servers vLLM serves /metrics without our collectors: the patch says so
    and names the way out; with the default registry it stays silent."""
    from prometheus_client import CollectorRegistry

    from vllm_tslt.edge import stats
    from vllm_tslt.patches import metrics

    monkeypatch.setattr(stats, "_registered", {})
    monkeypatch.setattr("prometheus_client.REGISTRY", CollectorRegistry())
    stats.register_metrics(tmp_path / "a.json", tmp_path / "b.json")
    assert stats.registered_paths() == [tmp_path / "a.json", tmp_path / "b.json"]
    import prometheus_client

    with caplog.at_level("WARNING", logger="vllm_tslt.patches.metrics"):
        metrics._wrap_get_prometheus_registry(lambda: prometheus_client.REGISTRY)()
        assert not caplog.records
        metrics._wrap_get_prometheus_registry(CollectorRegistry)()
    assert "--api-server-count 1" in caplog.text and "b.json" in caplog.text
