"""Adaptive draft length: online estimates and the TK-SLT optimal-γ rule.

Per round the device sends γ draft tokens and the edge emits the accepted ones plus one more token.
With per-token acceptance α (i.i.d. model), the expected number of tokens per round is

    E(γ) = (1 - α^(γ+1)) / (1 - α)

and a round takes (device drafting not hidden by proactive drafting, then the link and the verify):

    T(γ) = γ · t_draft · (1 - h) + r(bytes(γ)) + γ · c_v,
    r(b) = r0 + b / uplink_rate,   bytes(γ) = b0 + γ · b1

where h is the proactive hit rate (the next draft was ready when the commit came) and c_v the
edge's verification cost per draft token. The edge alone emits one token per target step t_step,
so the speedup is S(γ) = E(γ) · t_step / T(γ). The edge reports t_step and c_v for its current
load (``EdgeStatus``, a few times a second); plain steps seen without a draft also feed t_step.

The model can be optimistic (a draft sent ahead makes its round look short; its misses cost whole
round trips), so speculation also stays on only while the *measured* speedup — tokens per second of
the requests being drafted for, times t_step — is at least min_speedup. We pick
γ* = argmax S over 1..γ_max (a direct search instead of TK-SLT's Lambert-W closed form, which assumes
the same cost model without the bytes term) and switch speculation off (γ = 0, the edge decodes alone)
when S(γ*) < min_speedup. While off, one probe round every ``probe_interval_s`` refreshes α and r, so
speculation comes back when the link or the acceptance recovers.

Estimates use exponential forgetting (half-life in observations), so they follow a changing link.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from vllm_tslt.core.estimators import DiscountedLine, Ewma

logger = logging.getLogger(__name__)

PROBE_KEEP = 0.5  # a probe round's observation discounts older evidence by this much more
MIN_INTERVALS = 4  # commit intervals while speculating before the measured speedup is trusted
BRANCH_UPLINK_SHARE = 0.5  # at most this share of a round's uplink capacity goes to branches


def expected_tokens(alpha: float, gamma: int) -> float:
    """E(γ) = Σ_{i=0..γ} α^i = (1 - α^(γ+1)) / (1 - α): tokens emitted per round."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass
class AdaptiveConfig:
    gamma_max: int = 8
    fixed_gamma: int | None = None  # set: always this γ (estimates are still kept for stats)
    min_speedup: float = 1.05
    probe_interval_s: float = 2.0
    half_life: float = 16.0  # observations
    prior_alpha: float = 0.7

    def __post_init__(self) -> None:
        if not isinstance(self.gamma_max, int) or self.gamma_max < 1:
            raise ValueError(f"gamma_max must be an int >= 1, got {self.gamma_max!r}")
        if self.fixed_gamma is not None and not 1 <= self.fixed_gamma <= self.gamma_max:
            raise ValueError(f"fixed_gamma must be in 1..gamma_max, got {self.fixed_gamma!r}")
        if not 0 < self.min_speedup < 100:
            raise ValueError(f"min_speedup must be in (0, 100), got {self.min_speedup!r}")
        if not self.probe_interval_s > 0:
            raise ValueError(f"probe_interval_s must be > 0, got {self.probe_interval_s!r}")
        if not self.half_life > 0:
            raise ValueError(f"half_life must be > 0, got {self.half_life!r}")
        if not 0 < self.prior_alpha < 1:
            raise ValueError(f"prior_alpha must be in (0, 1), got {self.prior_alpha!r}")


class LinkModel(DiscountedLine):
    """Round time r = r0 + bytes / rate (x = payload bytes, y = seconds)."""

    @property
    def rate_bytes_per_s(self) -> float | None:
        return self.rate


class GammaController:
    """Online estimates + the choice of γ (0 = speculation off). Single-threaded."""

    def __init__(self, cfg: AdaptiveConfig) -> None:
        self.cfg = cfg
        decay = 0.5 ** (1.0 / cfg.half_life)
        self._decay = decay
        self._acc = 2.0 * cfg.prior_alpha  # discounted accepted tokens
        self._rej = 2.0 * (1.0 - cfg.prior_alpha)  # discounted rejections
        self.draft_s_per_token = Ewma(cfg.half_life)
        self.target_step_s = Ewma(cfg.half_life)
        self.verify_s_per_token = 0.0  # the edge's report (EdgeStatus.draft_token_ms)
        self.bytes_fixed = Ewma(cfg.half_life)  # b0 (unused until header size is reported)
        self.bytes_per_token = Ewma(cfg.half_life)  # b1
        self.hit_rate = Ewma(cfg.half_life)
        self.link = LinkModel(cfg.half_life)
        # What speculating actually delivers: tokens and seconds per commit interval while a draft
        # was requested (ratio of means). Checks the model, which can be optimistic (e.g. drafts
        # sent ahead make rounds look short while misses cost whole round trips).
        self.spec_tokens = Ewma(cfg.half_life)
        self.spec_seconds = Ewma(cfg.half_life)
        self.spec_intervals = 0
        self.rounds = 0
        self.enabled = True
        self._last_probe = -math.inf
        self._probing = False
        self._probe_pending = False  # a probe was let through: its interval replaces the old ones
        self.gamma = cfg.fixed_gamma or min(4, cfg.gamma_max)

    # -- observations ------------------------------------------------------------------------

    def observe_round(self, gamma: int, accepted: int, payload_bytes: int, round_s: float,
                      sent_tokens: int | None = None) -> None:
        """γ draft tokens were verified and ``accepted`` of them accepted; the draft carried
        ``sent_tokens`` (default γ; more when the edge verified a prefix only) in
        ``payload_bytes``; ``round_s`` = send -> commit received."""
        # NOTE: probes are rare, so each one weighs as much as the older evidence together.
        keep = PROBE_KEEP if self._probing else 1.0
        self._probing = False
        self._acc = self._decay * keep * self._acc + accepted
        self._rej = self._decay * keep * self._rej + (1.0 if accepted < gamma else 0.0)
        # NOTE: per-token bytes include the frame header's share; fine for choosing γ near the
        # observed ones, which is where the estimate is used.
        self.bytes_per_token.add(payload_bytes / max(sent_tokens or gamma, 1))
        # The edge's verification share of the round is modelled apart (it grows with γ and load).
        self.link.add(payload_bytes, max(round_s - gamma * self.verify_s_per_token, 0.0), keep)
        self.rounds += 1

    def observe_draft(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0:
            self.draft_s_per_token.add(seconds / num_tokens)

    def observe_target_step(self, seconds: float) -> None:
        """The edge emitted one token without a draft of ours (a plain step) in ``seconds``."""
        self.target_step_s.add(seconds)

    def observe_edge_status(self, step_s: float, draft_token_s: float) -> None:
        """The edge's own report: its plain step time now and what each draft token adds to a
        step. Under load both grow, and speculation stops paying sooner."""
        self.target_step_s.add(step_s)
        self.verify_s_per_token = draft_token_s

    def observe_interval(self, tokens: int, seconds: float) -> None:
        """A commit interval of a request we were drafting for: ``tokens`` emitted in ``seconds``.
        A probe's interval weighs as much as all older evidence: the link or load may have changed."""
        weight = 1 - PROBE_KEEP if self._probe_pending else None
        self._probe_pending = False
        self.spec_tokens.add(float(tokens), weight)
        self.spec_seconds.add(max(seconds, 1e-6), weight)
        self.spec_intervals += 1

    def measured_speedup(self) -> float | None:
        """Tokens per second while speculating × the edge's plain step time; None until known."""
        t_step, tok, sec = (self.target_step_s.value, self.spec_tokens.value,
                            self.spec_seconds.value)
        if t_step is None or tok is None or sec is None or self.spec_intervals < MIN_INTERVALS:
            return None
        return tok / sec * t_step

    def observe_proactive(self, hit: bool) -> None:
        self.hit_rate.add(1.0 if hit else 0.0)

    # -- model -------------------------------------------------------------------------------

    def branch_budget(self, gamma: int, cap: int) -> int:
        """Send-ahead branches per round (``branch_budget: auto``): as many γ-token drafts as fit
        in BRANCH_UPLINK_SHARE of what the uplink carries during one round, at most ``cap``.

        A round lasts round_time(γ); the link carries rate · round_time bytes in it, a branch
        costs about bytes(γ). While the rate is unknown (no rounds yet, or round times that do
        not grow with payload: a link fast against the round) the cap applies.
        """
        rate = self.link.rate_bytes_per_s
        per_branch = (self.bytes_fixed.value or 0.0) + gamma * (self.bytes_per_token.value or 0.0)
        if gamma < 1 or cap < 1:
            return 0
        if rate is None or per_branch <= 0:
            return cap
        fit = int(BRANCH_UPLINK_SHARE * rate * self.round_time(gamma) / per_branch)
        return max(0, min(cap, fit))

    def branch_gamma(self, gamma: int) -> int:
        """Draft length of a send-ahead branch: the chain extensions the device makes while the
        edge verifies the γ-token draft in flight (t_step + γ · c_v), at least 1, at most γ. A
        branch is worth most when it reaches the edge before the commit does; the extensions it
        is measured in are the device's real ones (batched with every branch). Unknown times: γ."""
        t_extend, t_step = self.draft_s_per_token.value, self.target_step_s.value
        if not t_extend or t_step is None:
            return gamma
        return max(1, min(gamma, int((t_step + gamma * self.verify_s_per_token) / t_extend)))

    @property
    def alpha(self) -> float:
        return self._acc / (self._acc + self._rej)

    def round_time(self, gamma: int) -> float:
        t_draft = self.draft_s_per_token.value or 0.0
        hidden = self.hit_rate.value or 0.0
        payload = (self.bytes_fixed.value or 0.0) + gamma * (self.bytes_per_token.value or 0.0)
        return (gamma * t_draft * (1.0 - hidden) + self.link.predict(payload)
                + gamma * self.verify_s_per_token)

    def speedup(self, gamma: int) -> float | None:
        """Predicted speedup over the edge alone; None until a plain step time is known."""
        t_step = self.target_step_s.value
        if t_step is None or self.link.count == 0:
            return None
        return expected_tokens(self.alpha, gamma) * t_step / max(self.round_time(gamma), 1e-9)

    def best_gamma(self) -> tuple[int, float | None]:
        """(γ*, S(γ*)) by direct search; without a step time, maximise tokens per second."""
        def rate(g: int) -> float:
            return expected_tokens(self.alpha, g) / max(self.round_time(g), 1e-9)
        best = max(range(1, self.cfg.gamma_max + 1), key=rate)
        return best, self.speedup(best)

    def choose(self, now: float) -> int:
        """γ for the next draft; 0 = speculation off (a probe round is let through periodically)."""
        if self.cfg.fixed_gamma is not None:
            return self.cfg.fixed_gamma
        gamma, speedup = self.best_gamma()
        measured = self.measured_speedup()
        pays = ((speedup is None or speedup >= self.cfg.min_speedup)
                and (measured is None or measured >= self.cfg.min_speedup))
        if pays != self.enabled:
            logger.info("speculation %s: alpha=%.2f predicted speedup %s at gamma=%d, measured %s",
                        "on" if pays else "off", self.alpha,
                        "n/a" if speedup is None else f"{speedup:.2f}", gamma,
                        "n/a" if measured is None else f"{measured:.2f}")
            self.enabled = pays
        self.gamma = gamma
        if pays:
            return gamma
        if now - self._last_probe >= self.cfg.probe_interval_s:
            self._last_probe = now
            self._probing = self._probe_pending = True
            return gamma  # probe: one round to refresh α, the round time and the measured rate
        return 0

    def snapshot(self) -> dict[str, float | int | bool | None]:
        gamma, speedup = self.best_gamma()
        return {"alpha": round(self.alpha, 4), "gamma": gamma, "enabled": self.enabled,
                "predicted_speedup": None if speedup is None else round(speedup, 3),
                "measured_speedup": _round(self.measured_speedup()),
                "draft_ms_per_token": _ms(self.draft_s_per_token.value),
                "target_step_ms": _ms(self.target_step_s.value),
                "edge_verify_ms_per_token": _ms(self.verify_s_per_token),
                "round_ms_at_gamma": _ms(self.round_time(gamma)),
                "uplink_bytes_per_s": self.link.rate_bytes_per_s,
                "proactive_hit_rate": self.hit_rate.value, "rounds": self.rounds}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
