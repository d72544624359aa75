"""The round model behind scripts/predict_gpu.py (vllm_tslt/bench/round_prediction.py)."""

from __future__ import annotations

import math

import pytest

from vllm_tslt.bench.round_prediction import (
    RoundCosts,
    alpha_from_acceptance,
    colocated_speedup,
    hit_needed,
    roofline_verify_cost,
    wait_speedup,
    with_hit,
)

pytestmark = pytest.mark.unit


def test_a_round_with_nothing_to_wait_for_gains_its_expected_tokens():
    c = RoundCosts(alpha=0.5, gamma=4, rtt=0.0, draft=0.0)
    assert wait_speedup(c) == pytest.approx((1 - 0.5 ** 5) / 0.5)  # E(4) = 1.9375
    # Nothing accepted: one token per step, whatever the link.
    assert wait_speedup(RoundCosts(alpha=0.0, gamma=4, rtt=0.0, draft=0.0)) == pytest.approx(1.0)


def test_the_wait_is_paid_on_misses_only():
    c = RoundCosts(alpha=0.6, gamma=4, rtt=2.0, draft=0.2, verify=0.01, overhead=1.0, extra=0.5)
    e = c.tokens
    assert wait_speedup(c) == pytest.approx(e / (1.04 + 2.0 + 0.8 + 0.5))
    assert wait_speedup(with_hit(c, 1.0)) == pytest.approx(e / 1.04)
    half = wait_speedup(with_hit(c, 0.5))
    assert half == pytest.approx(e / (1.04 + 0.5 * 3.3))
    assert wait_speedup(c) < half < wait_speedup(with_hit(c, 1.0))


def test_alpha_from_acceptance_inverts_the_iid_round():
    # α = 0.75, γ = 4: (0.75 + 0.5625 + 0.421875 + 0.31640625) / 4 = 0.5127 of drafted tokens
    a = (0.75 + 0.75 ** 2 + 0.75 ** 3 + 0.75 ** 4) / 4
    assert alpha_from_acceptance(a, 4) == pytest.approx(0.75, abs=1e-9)
    assert alpha_from_acceptance(0.0, 4) == pytest.approx(0.0, abs=1e-9)
    assert alpha_from_acceptance(0.6, 1) == pytest.approx(0.6, abs=1e-9)  # γ = 1: the same
    with pytest.raises(ValueError, match="acceptance"):
        alpha_from_acceptance(1.0, 4)


def test_hit_needed_reaches_the_target_exactly_or_says_it_cannot():
    c = RoundCosts(alpha=0.78, gamma=4, rtt=2.0, draft=0.16, verify=0.005, overhead=1.03)
    h = hit_needed(c, 1.3)
    assert 0 < h < 1 and wait_speedup(with_hit(c, h)) == pytest.approx(1.3)
    breakeven = hit_needed(c, 1.0)  # waiting with no hit loses here (0.83×)
    assert wait_speedup(c) < 1.0 and wait_speedup(with_hit(c, breakeven)) == pytest.approx(1.0)
    assert hit_needed(c, c.tokens) == math.inf  # even all hits cannot pay the step's cost
    easy = RoundCosts(alpha=0.78, gamma=4, rtt=0.1, draft=0.0)
    assert hit_needed(easy, 1.5) == 0.0


def test_costs_are_validated_naming_the_field():
    for bad, field in (({"alpha": 1.0}, "alpha"), ({"gamma": 0}, "gamma"), ({"hit": 1.5}, "hit"),
                       ({"rtt": -1.0}, "rtt"), ({"overhead": 0.0}, "overhead")):
        with pytest.raises(ValueError, match=field):
            RoundCosts(**{"alpha": 0.5, "gamma": 4, "rtt": 1.0, "draft": 0.1, **bad})


def test_roofline_verify_cost_is_bandwidth_over_compute():
    assert roofline_verify_cost(4.8e12, 989e12) == pytest.approx(0.00485, rel=1e-3)


def test_the_colocated_drafter_pays_its_drafting_on_the_edge_and_no_link():
    c = RoundCosts(alpha=0.5, gamma=4, rtt=3.0, draft=0.2, verify=0.01, overhead=1.0)
    assert colocated_speedup(c, 0.125) == pytest.approx(c.tokens / (1.04 + 0.5))
    assert colocated_speedup(c, 0.0) == pytest.approx(wait_speedup(with_hit(c, 1.0)))


def _predict_gpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "predict_gpu.py"
    spec = importlib.util.spec_from_file_location("predict_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_gpu_measures_a_cell_in_target_steps():
    """scripts/predict_gpu.py's reading of a capacity record: α from accepted ÷ drafted tokens,
    h from the hub's count when the record has it (else the devices' bound), times over s."""
    pg = _predict_gpu()
    a4 = (0.75 + 0.75 ** 2 + 0.75 ** 3 + 0.75 ** 4) / 4
    record = {"round": 0, "rtt_over_step": 2.0, "draft_tokens_per_step": 4.0, "edge_steps": 100,
              "acceptance": a4, "edge_plain_step_ms_reported": 10.0,
              "edge_verify_ms_per_token": 0.5, "edge_wait_ms_per_step": 30.0, "rtt_ms": 20.0,
              "device_draft_ms_per_token": 2.0, "server_tokens_per_s": 150.0,
              "device_counters": {"ahead_hits": 30, "branch_hits": 10, "commits": 200},
              "hub": {"drafts_ahead_hits": 25}}
    target = {"server_tokens_per_s": 100.0}  # s = 10 ms
    from pathlib import Path

    cell = pg._measure(Path("run/results.json"), record, target)
    assert cell["alpha"] == pytest.approx(0.75, abs=1e-6)
    assert (cell["hit"], cell["hit_source"]) == (0.25, "edge")
    assert cell["step"] == pytest.approx(1.2) and cell["wait"] == pytest.approx(3.0)
    assert cell["measured"] == pytest.approx(1.5)
    assert cell["extra"] == pytest.approx(3.0 / 0.75 - (2.0 + 4 * 0.2))  # 1.2 steps
    del record["hub"]
    assert pg.hit_rate(record) == (0.2, "device")  # (30 + 10) / 200 commits
