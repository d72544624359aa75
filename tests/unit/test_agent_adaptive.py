"""Adaptive γ: the estimator reacts to an emulated slow link and recovers on a fast one."""

from __future__ import annotations

import random

import pytest

from vllm_tslt.agent.adaptive import AdaptiveConfig, GammaController, LinkModel, expected_tokens

pytestmark = pytest.mark.unit


class EmulatedLink:
    """Round time = rtt + verify + payload / rate; acceptance i.i.d. with probability alpha."""

    def __init__(self, rtt_s: float, rate_bps: float, alpha: float, seed: int = 0) -> None:
        self.rtt_s, self.rate, self.alpha = rtt_s, rate_bps, alpha
        self.rng = random.Random(seed)

    def round(self, ctl: GammaController, gamma: int) -> None:
        accepted = 0
        while accepted < gamma and self.rng.random() < self.alpha:
            accepted += 1
        payload = 30 + 70 * gamma
        ctl.observe_round(gamma, accepted, payload, self.rtt_s + 0.01 + payload / self.rate)


def drive(ctl: GammaController, link: EmulatedLink, seconds: float, t0: float,
          dt: float = 0.02) -> tuple[list[int], float]:
    """Run the controller for ``seconds`` of emulated time; returns the γ chosen per step."""
    chosen, t = [], t0
    while t < t0 + seconds:
        gamma = ctl.choose(t)
        chosen.append(gamma)
        ctl.observe_draft(1, 0.002)
        if gamma:
            link.round(ctl, gamma)
        else:
            ctl.observe_target_step(0.02)  # the edge decoded alone
        t += dt
    return chosen, t


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_link_model_identifies_base_and_rate():
    link = LinkModel(half_life=50)
    for gamma in [1, 2, 4, 8] * 10:
        num_bytes = 100 * gamma
        link.add(num_bytes, 0.03 + num_bytes / 20_000)
    r0, slope = link.fit()
    assert r0 == pytest.approx(0.03, rel=1e-6) and 1 / slope == pytest.approx(20_000, rel=1e-6)
    flat = LinkModel(half_life=50)
    for _ in range(10):
        flat.add(500, 0.05)  # one payload size: no rate is invented
    assert flat.fit() == pytest.approx((0.05, 0.0))


def test_slow_link_shrinks_gamma_then_switches_off_and_fast_link_turns_it_back_on():
    ctl = GammaController(AdaptiveConfig(gamma_max=8, probe_interval_s=0.5))
    ctl.observe_target_step(0.02)
    fast = EmulatedLink(rtt_s=0.002, rate_bps=50e6, alpha=0.85)
    chosen, t = drive(ctl, fast, 2.0, 0.0)
    gamma_fast = chosen[-1]
    assert gamma_fast >= 4 and ctl.enabled and ctl.speedup(gamma_fast) > 2

    narrow = EmulatedLink(rtt_s=0.002, rate_bps=20_000, alpha=0.85)  # 20 kB/s uplink
    chosen, t = drive(ctl, narrow, 2.0, t)
    assert 1 <= chosen[-1] < gamma_fast  # bytes cost time: shorter drafts
    assert 10_000 < ctl.link.rate_bytes_per_s < 40_000  # the uplink rate is learnt

    slow = EmulatedLink(rtt_s=0.25, rate_bps=20_000, alpha=0.85)  # and a 250 ms round trip
    chosen, t = drive(ctl, slow, 4.0, t)
    assert not ctl.enabled and chosen[-1] == 0
    tail = chosen[len(chosen) // 2:]
    assert 0 < sum(g > 0 for g in tail) <= len(tail) // 10  # off, with occasional probes

    chosen, t = drive(ctl, fast, 3.0, t)
    assert ctl.enabled and chosen[-1] >= 4  # a probe saw the fast link: back on


def test_low_acceptance_switches_off():
    ctl = GammaController(AdaptiveConfig(gamma_max=8, probe_interval_s=1.0))
    ctl.observe_target_step(0.02)
    chosen, _ = drive(ctl, EmulatedLink(rtt_s=0.015, rate_bps=1e6, alpha=0.05), 3.0, 0.0)
    assert not ctl.enabled and chosen[-1] == 0


def test_fixed_gamma_never_switches_off():
    ctl = GammaController(AdaptiveConfig(gamma_max=6, fixed_gamma=3))
    ctl.observe_target_step(0.001)
    chosen, _ = drive(ctl, EmulatedLink(rtt_s=1.0, rate_bps=1000, alpha=0.1), 1.0, 0.0)
    assert set(chosen) == {3}
    assert ctl.snapshot()["predicted_speedup"] < 1


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="gamma_max"):
        AdaptiveConfig(gamma_max=0)
    with pytest.raises(ValueError, match="fixed_gamma"):
        AdaptiveConfig(gamma_max=4, fixed_gamma=5)


def test_measured_rate_overrides_an_optimistic_model():
    """Rounds that look short (drafts sent ahead) but deliver fewer tokens per second than the
    edge alone: the measured speedup switches speculation off; a good probe switches it back."""
    ctl = GammaController(AdaptiveConfig(gamma_max=4, probe_interval_s=1.0))
    ctl.observe_edge_status(0.010, 0.0)  # the edge's plain step: 10 ms
    for _ in range(20):
        ctl.observe_round(4, 3, 400, 0.011)  # the model sees fast, well-accepted rounds
        ctl.observe_interval(1, 0.030)  # ... but each commit brings 1 token per 30 ms
    assert ctl.best_gamma()[1] > 1.5  # the model alone would speculate
    assert ctl.measured_speedup() == pytest.approx(1 / 3, rel=1e-6)
    assert ctl.choose(now=100.0) == 4  # the first call after the switch lets a probe through
    ctl.observe_interval(1, 0.030)  # the probe's interval: still slow
    assert ctl.choose(now=100.1) == 0 and not ctl.enabled
    assert ctl.choose(now=101.2) == 4  # next probe
    ctl.observe_interval(5, 0.010)  # the link got better: 5 tokens in 10 ms
    assert ctl.measured_speedup() > 1.05  # one probe weighs as much as the old evidence
    assert ctl.choose(now=101.3) == 4 and ctl.enabled


def test_a_step_decoded_without_the_draft_is_not_a_rejection():
    """Protocol 3: the commit says how many draft tokens the edge verified. A plain step whose
    token differs from the draft's first one (0 verified) must not count as a rejection at
    position 0 (before, it did, and the acceptance estimate sank whenever the edge's intake
    decoded plainly); a verified prefix shorter than the draft is a round of that length."""
    from collections import Counter
    from types import SimpleNamespace

    from vllm_tslt.agent.runtime import DraftRuntime
    from vllm_tslt.agent.track import SentDraft
    from vllm_tslt.protocol import Commit

    ctl = GammaController(AdaptiveConfig())
    agent = SimpleNamespace(counters=Counter(), gamma_ctl=ctl)
    sent = SentDraft(10, [5, 6, 7, 8], 0.0, 40)
    alpha = ctl.alpha
    assert not DraftRuntime._observe_round(agent, sent, Commit(1, 11, (9,), verified=0), 0.01)
    assert ctl.alpha == alpha and ctl.rounds == 0 and agent.counters["drafts_unused"] == 1
    assert DraftRuntime._observe_round(agent, sent, Commit(1, 11, (9,), verified=4), 0.01)
    assert ctl.alpha < alpha and agent.counters["accepted_tokens"] == 0  # a real rejection at 0
    before = ctl.alpha
    assert DraftRuntime._observe_round(agent, sent, Commit(1, 13, (5, 6, 4), verified=2), 0.01)
    assert agent.counters["accepted_tokens"] == 2 and ctl.alpha > before  # 2 of 2: no rejection
    assert agent.counters["rounds"] == 2
