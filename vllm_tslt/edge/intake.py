"""Non-blocking draft intake: per step, wait for a late draft, park its request, or decode plainly.

A request's draft for its committed sequence leaves the device only after the edge has told it that
sequence, so it arrives `lateness` seconds after the commit (uplink + drafting + downlink: about
one round trip). At the end of each engine step (``propose``) the edge must decide, for every
request whose draft is still in flight, between

- **wait** a bounded time ``W`` for it: the whole engine stalls, every running request loses ``W``;
- **park** it: it is left out of the next ``k`` steps (vLLM's scheduler skips it, the rest of the
  batch runs without it) and is verified with its draft in the step after;
- **plain**: it decodes this step without a draft, as vLLM does without speculation.

All three are exact: parking only delays a request, plain decoding is vLLM's own path, and a draft
is used only for the committed prefix it was sampled for (as before). `decide_intake` is the
policy, a pure function of measured costs; `Intake` holds the measurements and drives the hub
(`DraftHub.in_flight` then `DraftHub.collect`) for the proposer and the fake engine alike;
`StepCost` is the proposer's fit of the engine's step time that feeds it.
docs/intake.md explains the model and its parameters.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_tslt.core.estimators import DiscountedLine, Ewma
from vllm_tslt.protocol import EdgeStatus

INTAKE_MODES = ("wait", "adaptive")  # == vllm_tslt.edge.config.INTAKE_MODES
LATENESS_HALF_LIFE = 16.0  # drafts
TOKENS_HALF_LIFE = 8.0  # drafted steps of one request
STEP_HALF_LIFE = 16.0  # steps
STEP_COST_HALF_LIFE = 32.0  # steps (StepCost's fit)
# Tokens a drafted step is assumed to emit before any was measured on this edge (accepted + bonus):
# 2 = one accepted draft token, enough to try drafts; measurements replace it within a few steps.
PRIOR_TOKENS_PER_DRAFT = 2.0
# A chosen wait W ends at W·WAIT_SLACK + WAIT_SLACK_S at the latest (within the deadline), and
# earlier as soon as every draft waited for is in: a draft due at W that comes a little later
# (scheduling jitter) is still used, for a small cost only when it does not come at all.
WAIT_SLACK = 1.25
WAIT_SLACK_S = 0.002


class Lateness:
    """How long after a commit a device's draft for it arrives, seconds: mean + mean deviation.

    Fed by the hub's I/O thread (`SessionTable.store_draft`, first draft for the committed
    prefix); read by `DraftHub.in_flight`. The deviation term makes the estimate a high-ish
    quantile (about the 80th percentile of a normal spread), so a wait rarely ends just short.
    """

    def __init__(self) -> None:
        self.mean = Ewma(LATENESS_HALF_LIFE)
        self.dev = Ewma(LATENESS_HALF_LIFE)

    def add(self, seconds: float) -> None:
        if self.mean.value is not None:
            self.dev.add(abs(seconds - self.mean.value))
        self.mean.add(seconds)

    def estimate(self) -> float | None:
        if self.mean.value is None:
            return None
        return self.mean.value + (self.dev.value or 0.0)


@dataclass(frozen=True)
class Pending:
    """A request whose draft for its committed sequence has not arrived."""

    request_id: str
    eta_s: float | None  # expected seconds until it arrives (0: due); None: nothing measured yet
    gain_tokens: float  # expected tokens a drafted step emits beyond a plain step's one
    parked_steps: int = 0  # steps it has been parked in a row
    in_batch: bool = True  # ran in the step just finished (False: parked out of it)
    draft_tokens: float = 0.0  # expected length of its draft (its last one's; 0: unknown)


@dataclass(frozen=True)
class IntakeCosts:
    step_s: float | None  # an engine step's time, waits excluded (None: not measured yet)
    running: int  # requests the engine runs (batch + parked): every one stalls during a wait
    batch: int  # requests in the step just finished (drafted or not)
    max_wait_s: float  # speculative_config.draft_deadline_ms: no wait is longer
    max_park_steps: int  # speculative_config.intake_max_park_steps (0: never park)
    mode: str = "adaptive"  # speculative_config.intake
    verify_s_per_token: float = 0.0  # what each draft token verified adds to a step


@dataclass(frozen=True)
class IntakeDecision:
    wait_s: float  # how long the engine waits at most
    wait_for: frozenset[str]  # the wait ends early once all of these have their drafts
    park: frozenset[str]  # left out of the next step unless their draft comes during the wait
    value_s: float = 0.0  # the model's gain over decoding all plainly (request-seconds)


def decide_intake(pending: Sequence[Pending], costs: IntakeCosts) -> IntakeDecision:
    """The intake policy: what maximises the batch's progress, in request-seconds.

    With s the step time at the current load, g_r = τ_r - 1 the tokens a draft adds to request
    r's next step, and v_r = c·γ_r·running what verifying its γ_r draft tokens costs the batch
    (c: the step's cost per draft token; every running request waits for the longer step):

    - waiting W gains g_r·s - v_r for every r whose draft is due within W (eta_r <= W) and costs
      W·running (every running request stalls): value(W) = Σ_{eta_r <= W} (g_r·s - v_r) - running·W;
    - parking r for k = max(1, ⌈eta_r / s⌉) steps turns k + 1 plain tokens into τ_r = g_r + 1:
      (g_r - k)·s - v_r, allowed while parked_steps + k <= max_park_steps and while someone else
      runs in the next step (an empty step hands no drafts over);
    - plain decoding is the baseline (0).

    W is chosen among 0 and the etas within max_wait_s; each request not covered by W is parked
    when that gains, else decodes plainly. The wait itself is bounded by W·WAIT_SLACK +
    WAIT_SLACK_S (and max_wait_s); it ends as soon as the drafts waited for are in. No step time
    measured yet, or mode "wait": wait for all up to max_wait_s (the behaviour before intake).
    """
    ids = frozenset(p.request_id for p in pending)
    if not pending:
        return IntakeDecision(0.0, frozenset(), frozenset())
    if costs.mode == "wait" or costs.step_s is None or costs.step_s <= 0:
        return IntakeDecision(costs.max_wait_s, ids, frozenset())
    s = costs.step_s
    # A device not measured yet is assumed due at the deadline; its late drafts are measured
    # anyway (SessionTable.store_draft), so it is known after its first draft.
    pending = [p if p.eta_s is not None else dataclasses.replace(p, eta_s=costs.max_wait_s)
               for p in pending]
    verify = {p.request_id: costs.verify_s_per_token * p.draft_tokens * costs.running
              for p in pending}
    park_value = {p.request_id: _park_value(p, s, costs.max_park_steps) - verify[p.request_id]
                  for p in pending}
    best = IntakeDecision(0.0, frozenset(), frozenset(), -math.inf)
    waits = sorted({0.0} | {p.eta_s for p in pending if p.eta_s <= costs.max_wait_s})
    for allow_park in (True, False):
        for w in waits:
            value, wait_for, park = -costs.running * w, set(), set()
            for p in pending:
                if p.eta_s <= w:
                    gain = p.gain_tokens * s - verify[p.request_id]
                    if gain > 0:  # (a draft that adds nothing is not waited for)
                        value += gain
                        wait_for.add(p.request_id)
                elif allow_park and park_value[p.request_id] > 0:
                    value += park_value[p.request_id]
                    park.add(p.request_id)
            if park and not _someone_runs(pending, park, costs.batch):
                continue
            if value > best.value_s + 1e-12:
                best = IntakeDecision(w, frozenset(wait_for), frozenset(park), value)
        if best.value_s > -math.inf:
            break
    if best.value_s <= 0:  # nothing pays: decode all plainly, no wait
        return IntakeDecision(0.0, frozenset(), frozenset(), 0.0)
    if best.wait_for:
        bound = min(costs.max_wait_s, best.wait_s * WAIT_SLACK + WAIT_SLACK_S)
        best = dataclasses.replace(best, wait_s=bound)
    return best


def _park_value(p: Pending, step_s: float, max_park_steps: int) -> float:
    steps = max(1, math.ceil(p.eta_s / step_s - 1e-9))
    if p.parked_steps + steps > max_park_steps:
        return -math.inf
    return (p.gain_tokens - steps) * step_s


def _someone_runs(pending: Sequence[Pending], park: set[str], batch: int) -> bool:
    """Does any request run in the next step if `park` is parked? (In-batch requests that are
    not pending run; parked ones that return run too.)"""
    in_batch_parked = sum(1 for p in pending if p.in_batch and p.request_id in park)
    returning = sum(1 for p in pending if not p.in_batch and p.request_id not in park)
    return batch - in_batch_parked + returning > 0


class StepCost:
    """The engine's step time as a + c · (draft tokens verified in the step), fitted online.

    A step's time is from the end of one ``propose`` to the start of the next (the forward pass
    that verifies the drafts handed out, sampling, scheduling; not the wait for drafts). Steps
    after an idle gap (no request carried over) are skipped. ``a`` is what a plain step of the
    running batch costs, ``c`` the verification cost per draft token: what devices need to decide
    whether speculating pays under the current load (``EdgeStatus``).
    """

    def __init__(self) -> None:
        self.line = DiscountedLine(STEP_COST_HALF_LIFE)
        self._end: float | None = None
        self._batch: frozenset[str] = frozenset()
        self._draft_tokens = 0

    def step_started(self, now: float, req_ids: list[str]) -> None:
        if self._end is not None and not self._batch.isdisjoint(req_ids):
            self.line.add(self._draft_tokens, now - self._end)

    def step_ended(self, now: float, req_ids: list[str], draft_tokens: int) -> None:
        self._end, self._batch, self._draft_tokens = now, frozenset(req_ids), draft_tokens

    def fit(self) -> tuple[float, float] | None:
        """(a, c) in seconds; None before the first step was measured."""
        return self.line.fit() if self.line.count else None

    def status(self, running: int) -> EdgeStatus | None:
        fit = self.fit()
        return None if fit is None else EdgeStatus(fit[0] * 1e3, fit[1] * 1e3, running)


class Intake:
    """The edge's side of the intake policy: measurements, parked requests, and one call per step.

    `gather` is called once per engine step where the proposer used to call `collect`: it asks
    the hub which drafts are in flight and when they are due, decides (`decide_intake`), collects,
    and returns the drafts plus the requests to park for the next step. `observe` feeds the tokens
    each drafted step emitted (τ), `forget` drops a finished request.
    """

    def __init__(self, mode: str, max_wait_s: float, max_park_steps: int) -> None:
        self.mode = mode
        self.max_wait_s = max_wait_s
        self.max_park_steps = max_park_steps
        self.parked: dict[str, int] = {}  # request -> steps parked in a row (parked now)
        self._tokens: dict[str, Ewma] = {}  # request -> tokens per drafted step
        self._tokens_all = Ewma(TOKENS_HALF_LIFE)  # every request: the prior of a new one
        self._draft_len: dict[str, int] = {}  # request -> its last draft's length
        self._draft_len_all = 0  # the last draft's length of any request (0: none yet)
        self._step = Ewma(STEP_HALF_LIFE)
        self._end: float | None = None
        self._batch: frozenset[str] = frozenset()
        self.last_decision = IntakeDecision(0.0, frozenset(), frozenset())
        # Test-only (VLLM_TSLT_TEST_SWITCHES=1, set by the proposer): requests whose decisions are
        # drawn at random instead of by the policy, so every intake path is exercised whatever
        # the machine's timing (tests/e2e/test_edge_intake.py's statistical test).
        self._shuffled: dict[str, random.Random] = {}

    @classmethod
    def from_config(cls, config: Any) -> Intake:
        return cls(config.intake, config.draft_deadline_ms / 1000.0, config.intake_max_park_steps)

    @property
    def step_s(self) -> float | None:
        return self._step.value

    def observe(self, request_id: str, tokens: int) -> None:
        """A step that verified a draft of request_id emitted `tokens` tokens (accepted + 1)."""
        est = self._tokens.setdefault(request_id, Ewma(TOKENS_HALF_LIFE))
        est.add(float(tokens))
        self._tokens_all.add(float(tokens))

    def shuffle(self, request_id: str, seed: int | str) -> None:
        """Test-only: decide request_id's intake at random (wait, park or plain, each step its
        draft is in flight; `_shuffle_decision`) instead of by `decide_intake`, in mode
        "adaptive". Every choice is one the policy can make there, so the request's output must
        still follow the target exactly."""
        self._shuffled[request_id] = random.Random(f"{seed}:{request_id}")

    def forget(self, request_id: str) -> None:
        self.parked.pop(request_id, None)
        self._shuffled.pop(request_id, None)
        self._tokens.pop(request_id, None)
        self._draft_len.pop(request_id, None)

    def gain_tokens(self, request_id: str) -> float:
        est = self._tokens.get(request_id)
        tau = est.value if est is not None and est.value is not None else self._tokens_all.value
        return (PRIOR_TOKENS_PER_DRAFT if tau is None else tau) - 1.0

    def gather(self, hub: Any, batch: Sequence[str], batch_size: int,
               step_cost: tuple[float, float] | None = None) -> tuple[dict[str, Any], list[str]]:
        """Drafts for the bound requests of the step just finished (`batch`) and for the parked
        ones, after at most the wait the policy chose; and the requests to park next step.

        `batch_size` counts every request of the step just finished, bound or not. `step_cost`:
        the engine's fitted step time (a plain step, seconds per draft token verified), e.g. the
        `StepCost` fit; without it the step time is this object's own average and
        verifying a draft is taken to cost nothing.
        """
        now = time.perf_counter()
        if self._end is not None and not self._batch.isdisjoint(batch):
            self._step.add(now - self._end)  # a step, waits excluded (idle gaps skipped)
        for rid in batch:  # it ran: not parked any more
            self.parked.pop(rid, None)
        returning = [rid for rid in self.parked if rid not in set(batch)]
        candidates = [*batch, *returning]
        in_flight = hub.in_flight(candidates) if candidates else {}
        pending = [Pending(rid, eta, self.gain_tokens(rid), self.parked.get(rid, 0),
                           rid not in self.parked, self._draft_len.get(rid, self._draft_len_all))
                   for rid, eta in in_flight.items()]
        step_s, verify_s = self.step_s, 0.0
        if step_cost is not None and step_cost[0] > 0:
            step_s, verify_s = step_cost
        decision = decide_intake(pending, IntakeCosts(
            step_s, batch_size + len(returning), batch_size, self.max_wait_s,
            self.max_park_steps, self.mode, verify_s))
        if self._shuffled and self.mode == "adaptive":  # (`wait` never parks)
            decision = self._shuffle_decision(decision, pending, batch_size)
        drafts = hub.collect(candidates, decision.wait_s, wait_for=decision.wait_for,
                             defer=decision.park) if candidates else {}
        park = [rid for rid in candidates if rid in decision.park and rid not in drafts]
        for rid, draft in drafts.items():
            self._draft_len[rid] = self._draft_len_all = int(draft.gamma)
        self.last_decision = decision
        self._count(hub, decision, pending, drafts, park, returning)
        self.parked = {rid: self.parked.get(rid, 0) + 1 for rid in park}
        self._end, self._batch = time.perf_counter(), frozenset(candidates)
        return drafts, park

    def _shuffle_decision(self, decision: IntakeDecision, pending: list[Pending],
                          batch_size: int) -> IntakeDecision:
        """`decision` with the shuffled requests' choices drawn at random (`shuffle`): a third
        of the steps wait up to the deadline for every shuffled draft in flight; in the others
        each shuffled request is parked (within max_park_steps) or decodes plainly, at random.
        (Per request, a single wait would let every draft of the step in and leave nothing to
        park.) The other requests keep the policy's choices; when the shuffled parks would
        empty the next step they decode plainly instead (an empty step hands no draft over)."""
        shuffled = [p for p in pending if p.request_id in self._shuffled]
        if not shuffled:
            return decision
        ids = {p.request_id for p in shuffled}
        wait_for, park = set(decision.wait_for) - ids, set(decision.park) - ids
        wait_s = decision.wait_s
        if self._shuffled[shuffled[0].request_id].random() < 1 / 3:
            wait_for |= ids
            wait_s = self.max_wait_s
        else:
            parks = {p.request_id for p in shuffled if p.parked_steps < self.max_park_steps
                     and self._shuffled[p.request_id].random() < 0.5}
            if _someone_runs(pending, park | parks, batch_size):
                park |= parks
        return IntakeDecision(wait_s, frozenset(wait_for), frozenset(park), decision.value_s)

    @staticmethod
    def _count(hub: Any, decision: IntakeDecision, pending: list[Pending], drafts: dict[str, Any],
               park: list[str], returning: list[str]) -> None:
        if decision.wait_for:
            hub.count("intake_waits")
            hub.count("intake_waited_requests", len(decision.wait_for))
            hub.count("intake_wait_misses", len(decision.wait_for - drafts.keys()))
        if park:
            hub.count("intake_parks", len(park))
        plain = [p for p in pending if p.request_id not in drafts and p.request_id not in park
                 and p.request_id not in decision.wait_for]
        if plain:
            hub.count("intake_plain", len(plain))
        expired = sum(1 for p in pending if not p.in_batch and p.request_id not in drafts
                      and p.request_id not in park)
        if expired:
            hub.count("intake_parked_plain", expired)
        returned = sum(1 for rid in returning if rid in drafts)
        if returned:
            hub.count("intake_parked_drafted", returned)
