"""The round model behind scripts/predict_gpu.py (vllm_tslt/bench/round_prediction.py)."""

from __future__ import annotations

import math

import pytest

from vllm_tslt.bench.round_prediction import (
    RoundCosts,
    adaptive_speedup,
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


def test_adaptive_takes_the_better_of_waiting_and_plain_decoding():
    slow = RoundCosts(alpha=0.5, gamma=4, rtt=5.0, draft=0.2)  # waiting loses: plain wins
    assert wait_speedup(slow) < 1.0 and adaptive_speedup(slow) == pytest.approx(1.0)
    fast = RoundCosts(alpha=0.8, gamma=4, rtt=0.1, draft=0.05)
    assert adaptive_speedup(fast) == pytest.approx(wait_speedup(fast)) and wait_speedup(fast) > 1


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
