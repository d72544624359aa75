"""The benchmark's grid and its target checks (the runs themselves are `make bench`)."""

from __future__ import annotations

import pytest

from vllm_tslt.bench.main import targets
from vllm_tslt.bench.runner import COLOCATED, REMOTE, TARGET_ONLY, Plan, cells

pytestmark = pytest.mark.unit


def test_full_grid_covers_every_system_link_and_gamma() -> None:
    plan = Plan.make(quick=False)
    grid = cells(plan)
    links = [c for c in grid if c[0] == "links"]
    remote = {(c[1].name, c[2].uplink_mbps, c[2].rtt_ms, c[3]) for c in links if c[1].wire}
    assert len(remote) == len(REMOTE) * 5 * 3 * 2
    assert {c[2].rtt_ms for c in links if c[1] is TARGET_ONLY} == {5.0, 20.0, 50.0}
    assert {c[2].rtt_ms for c in links if c[1] is COLOCATED} == {5.0, 20.0, 50.0}
    devices = {(c[1].name, c[4]) for c in grid if c[0] == "devices"}
    assert {n for _, n in devices} == {1, 4, 16} and ("target-only", 16) in devices
    sweep = [c[1] for c in grid if c[0] == "sweep"]
    assert {s.top_k for s in sweep if s.name == "TSLT top-K"} == {4, 8, 16, 32, 64}


def test_quick_grid_is_small() -> None:
    assert len(cells(Plan.make(quick=True))) < len(cells(Plan.make(quick=False))) / 3


def _rec(system: str, **kw) -> dict:
    base = {"experiment": "links", "system": system, "uplink_mbps": 10.0, "rtt_ms": 20.0,
            "gamma": "4", "top_p": None, "bytes_per_draft_token": None, "tokens_per_s": 10.0,
            "speedup_vs_target_only": None, "acceptance": None, "draft_tokens_verified": 0}
    return {**base, **kw}


def test_targets_are_computed_from_the_records() -> None:
    records = [
        _rec("DSD fp16", bytes_per_draft_token=8000.0, tokens_per_s=10.0),
        _rec("TSLT top-p", bytes_per_draft_token=60.0, tokens_per_s=25.0),
        _rec("TSLT top-p", gamma="auto", uplink_mbps=1.0, speedup_vs_target_only=0.9),
        _rec("TSLT top-p", gamma="auto", uplink_mbps=100.0, speedup_vs_target_only=1.2),
    ]
    got = {t["name"]: t for t in targets(records)}
    bytes_row = got["TSLT top-p uplink bytes per draft token vs DSD fp16"]
    assert bytes_row["met"] is True and "0.75%" in bytes_row["value"]
    ratio = got["tokens/s at 10 Mbit/s, 20 ms RTT, gamma 4: TSLT top-p ÷ DSD fp16"]
    assert ratio["met"] is True and "2.50×" in ratio["value"]
    adaptive = got["TSLT top-p, adaptive gamma: lowest speedup over all links"]
    assert adaptive["met"] is False and adaptive["value"] == "0.90×"

