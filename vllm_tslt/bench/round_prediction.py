"""What one device's rounds cost an edge, in units of the target's plain step: the model behind
`scripts/predict_gpu.py` (issue 14: what the design predicts for a GPU edge).

A drafted round emits E(γ) = (1 - α^(γ+1)) / (1 - α) tokens, α the per-position acceptance (the
i.i.d. model of the agent's adaptive γ, `vllm_tslt.agent.adaptive.expected_tokens`; benchmarks
report accepted / drafted tokens instead, which `alpha_from_acceptance` converts), in one edge
step that costs

    o + κ·γ                                 (the edge's plain step, plus verifying γ draft tokens)

plus, when its draft was not already at the edge as the step began (a miss, probability 1 - h),
the wait for it:

    ρ + γ·δ + ε                             (round trip, drafting, lateness beyond both)

Every term is in plain steps of target-only decoding (s): o = the edge's plain step / s (1 = no
overhead), κ = a draft token's verification / s, ρ = RTT / s, δ = the device's drafting per token /
s, ε = lateness the other terms do not explain. So under `intake: wait`

    speedup = E / (o + κ·γ + (1 - h)·(ρ + γ·δ + ε)).

Many devices: the adaptive intake parks a request whose draft is late and the batch runs on
without it; on an edge whose step does not grow with the batch (a memory-bound decode) each
request keeps this one-device speedup. A parked request keeps its place among vLLM 0.32's running
requests (and its KV blocks), so it does not free a batch slot for another request.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vllm_tslt.agent.adaptive import expected_tokens


@dataclass(frozen=True)
class RoundCosts:
    alpha: float  # per-token acceptance
    gamma: int  # draft tokens per round
    rtt: float  # ρ: round-trip time / s
    draft: float  # δ: the device's drafting time per token / s
    verify: float = 0.0  # κ: verifying one draft token / s
    overhead: float = 1.0  # o: the edge's plain step / s
    extra: float = 0.0  # ε: lateness beyond rtt + drafting / s
    hit: float = 0.0  # h: drafted steps whose draft was already at the edge

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if not 0.0 <= self.hit <= 1.0:
            raise ValueError(f"hit must be in [0, 1], got {self.hit}")
        for name in ("rtt", "draft", "verify", "extra"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.overhead <= 0:
            raise ValueError(f"overhead must be > 0, got {self.overhead}")

    @property
    def tokens(self) -> float:
        return expected_tokens(self.alpha, self.gamma)

    @property
    def step(self) -> float:
        """A drafted step's compute: the plain step plus verification."""
        return self.overhead + self.verify * self.gamma

    @property
    def miss_wait(self) -> float:
        """What a miss waits for its draft."""
        return self.rtt + self.gamma * self.draft + self.extra


def wait_speedup(c: RoundCosts) -> float:
    """Tokens per second over target-only when every step waits for its draft."""
    return c.tokens / (c.step + (1.0 - c.hit) * c.miss_wait)


def hit_needed(c: RoundCosts, speedup: float) -> float:
    """The least hit rate h at which waiting reaches `speedup` (math.inf: not at any h ≤ 1)."""
    budget = c.tokens / speedup - c.step  # what the misses' waits may cost per round
    if budget < 0:
        return math.inf
    if c.miss_wait <= budget:
        return 0.0
    return 1.0 - budget / c.miss_wait


def alpha_from_acceptance(acceptance: float, gamma: int) -> float:
    """The per-position α whose i.i.d. rounds of γ draft tokens accept `acceptance` of them:
    solves (α + α² + ... + α^γ) / γ = acceptance (bisection; increasing in α)."""
    if not 0.0 <= acceptance < 1.0:
        raise ValueError(f"acceptance must be in [0, 1), got {acceptance}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(1, gamma + 1)) / gamma < acceptance:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def with_hit(c: RoundCosts, hit: float) -> RoundCosts:
    return dataclasses.replace(c, hit=hit)


def colocated_speedup(c: RoundCosts, draft_on_edge: float) -> float:
    """vLLM's co-located `draft_model` on the same edge: no link and no misses, but the edge
    itself drafts γ tokens per round at `draft_on_edge` target steps each."""
    return c.tokens / (c.step + c.gamma * draft_on_edge)


def roofline_verify_cost(hbm_bytes_per_s: float, flops_per_s: float) -> float:
    """κ of a memory-bound decode step at the roofline: one more token of a dense model with P
    parameters costs 2P FLOPs against the 2P bytes (bf16) the step reads anyway, so κ = the
    bandwidth / compute ratio (e.g. H200: 4.8e12 B/s over 989e12 FLOP/s ≈ 0.005). A lower bound:
    real kernels at a few tokens per request are less efficient than the roofline."""
    return hbm_bytes_per_s / flops_per_s
