"""The overhead benchmark's summary (vllm_tslt/bench/overhead.py): per-round ratios, medians."""

from __future__ import annotations

import pytest

from vllm_tslt.bench.overhead import SYSTEMS, Plan, ratios, write_report

pytestmark = pytest.mark.unit


def _records():
    out = []
    for r, (plain, edge) in enumerate([(100.0, 95.0), (80.0, 80.0), (120.0, 90.0)]):
        for system, tps in zip(SYSTEMS, (plain, edge, 50.0, 70.0)):
            out.append({"pair": "tiny", "system": system, "concurrency": 1, "round": r,
                        "output_throughput": tps, "mean_tpot_ms": 1000.0 / tps})
    return out


def test_ratios_are_medians_of_per_round_ratios(tmp_path):
    rows = {row["system"]: row for row in ratios(_records())}
    edge = rows["edge, no device"]
    assert edge["rounds"] == 3
    assert edge["vs_plain_median"] == pytest.approx(0.95)  # of 0.95, 1.0, 0.75
    assert (edge["vs_plain_min"], edge["vs_plain_max"]) == (pytest.approx(0.75), 1.0)
    assert edge["tok_s_median"] == 90.0 and rows["plain"]["vs_plain_median"] == 1.0
    plan = Plan()
    data = {"command": "x", "machine": "m", "when": "now", "summary": list(rows.values()),
            "plan": {**plan.__dict__, "edge_cpus": [0], "client_cpus": [1]}}
    text = write_report(data, tmp_path).read_text()
    assert "| tiny | 1 | edge, no device | 90.0 (80.0-95.0) | 11.11 | 0.950 (0.750-1.000) |" in text


def test_prompt_counts():
    plan = Plan()
    assert plan.num_prompts(1) == 16 and plan.num_prompts(16) == 64
