"""The intake policy (vllm_tslt/edge/intake.py): a pure function of measured costs, and the
bookkeeping around it (parking is bounded, a request never starves)."""

from __future__ import annotations

import pytest

from vllm_tslt.edge.config import TsltConfig, TsltConfigError
from vllm_tslt.edge.intake import (
    PRIOR_TOKENS_PER_DRAFT,
    WAIT_SLACK,
    WAIT_SLACK_S,
    Intake,
    IntakeCosts,
    Lateness,
    Pending,
    decide_intake,
)

pytestmark = pytest.mark.unit

STEP = 0.010  # s


def bounded(w):
    """The wait bound for a wait chosen at w (slack for jitter; it ends once the drafts are in)."""
    return w * WAIT_SLACK + WAIT_SLACK_S


def costs(running=2, batch=2, max_wait_s=0.2, max_park_steps=2, mode="adaptive", step_s=STEP):
    return IntakeCosts(step_s, running, batch, max_wait_s, max_park_steps, mode)


def test_wait_mode_and_an_unmeasured_engine_wait_for_everyone_up_to_the_deadline():
    pending = [Pending("a", 0.001, 3.0), Pending("b", 5.0, 3.0)]
    for c in (costs(mode="wait"), costs(step_s=None)):
        d = decide_intake(pending, c)
        assert (d.wait_s, d.wait_for, d.park) == (0.2, {"a", "b"}, set())
    assert decide_intake([], costs()).wait_s == 0.0


def test_a_fast_device_is_waited_for_and_a_slow_one_does_not_stall_the_batch():
    # a: due in 2 ms, 3 tokens gained: 3·10 ms - 2 requests·2 ms > 0. b: due in 150 ms: waiting
    # costs 300 request-ms for 30 gained; parking needs 15 steps (> 2): plain.
    d = decide_intake([Pending("a", 0.002, 3.0), Pending("b", 0.150, 3.0)], costs())
    assert d.wait_s == pytest.approx(bounded(0.002))
    assert d.wait_for == {"a"} and d.park == set()
    assert d.value_s == pytest.approx(3 * STEP - 2 * 0.002)


def test_a_draft_one_step_away_parks_its_request_when_others_run():
    # eta 8 ms < one step: park 1 step gains (3 - 1)·10 ms; waiting 8 ms for 3 requests costs
    # 24 request-ms against 30 gained (6): parking wins.
    d = decide_intake([Pending("a", 0.008, 3.0)], costs(running=3, batch=3))
    assert d.park == {"a"} and d.wait_s == 0.0 and d.value_s == pytest.approx(2 * STEP)


def test_parking_never_empties_the_next_step():
    # Alone in the batch, parking would leave the engine idle and hand no draft over: wait.
    d = decide_intake([Pending("a", 0.008, 3.0)], costs(running=1, batch=1))
    assert d.park == set() and d.wait_for == {"a"} and d.wait_s == pytest.approx(bounded(0.008))
    # Both requests of the batch pending: at most one can be parked.
    d = decide_intake([Pending("a", 0.008, 3.0), Pending("b", 0.009, 3.0)], costs())
    assert len(d.park) <= 1


def test_parking_is_bounded_by_max_park_steps():
    pending = [Pending("a", 0.015, 4.0)]  # 2 steps away: (4 - 2)·s per park
    assert decide_intake(pending, costs(running=3, batch=3)).park == {"a"}
    assert decide_intake(pending, costs(running=3, batch=3, max_park_steps=1)).park == set()
    parked_once = [Pending("a", 0.015, 4.0, parked_steps=1, in_batch=False)]
    assert decide_intake(parked_once, costs(running=3, batch=2)).park == set()
    assert decide_intake(pending, costs(running=3, batch=3, max_park_steps=0)).park == set()


def test_drafts_that_do_not_pay_are_neither_waited_for_nor_parked():
    d = decide_intake([Pending("a", 0.001, 0.0), Pending("b", 0.0, -0.5)], costs())
    assert (d.wait_s, d.wait_for, d.park) == (0.0, set(), set())


def test_the_wait_never_exceeds_the_deadline_and_an_unmeasured_device_counts_as_due_then():
    d = decide_intake([Pending("a", 0.5, 100.0)], costs(running=1, batch=1, max_wait_s=0.2))
    assert d.wait_s == 0.0 and d.wait_for == set()
    d = decide_intake([Pending("a", None, 100.0)], costs(running=1, batch=1, max_wait_s=0.2))
    assert d.wait_s == pytest.approx(0.2) and d.wait_for == {"a"}  # 100 tokens pay 0.2 s
    d = decide_intake([Pending("a", None, 1.0)], costs(running=1, batch=1, max_wait_s=0.2))
    assert d.wait_s == 0.0


def test_one_wait_serves_every_draft_due_within_it():
    pending = [Pending(f"r{i}", 0.001 * (i + 1), 1.0) for i in range(4)]
    d = decide_intake(pending, costs(running=4, batch=4))
    # W = 1, 2, 3, 4 ms: value 10k - 4·k ms for k drafts: all four.
    assert d.wait_for == {"r0", "r1", "r2", "r3"} and d.wait_s == pytest.approx(bounded(0.004))


def test_lateness_is_a_mean_plus_deviation():
    late = Lateness()
    assert late.estimate() is None
    for x in (0.010, 0.030) * 20:
        late.add(x)
    assert 0.025 < late.estimate() < 0.035


class FakeHub:
    """in_flight/collect as DraftHub answers them: the drafts of `late` in flight, due in `eta`,
    never arriving (a device that stalled after it was measured)."""

    def __init__(self, eta, late):
        self.eta, self.late = eta, late
        self.counters = {}

    def in_flight(self, request_ids):
        return {rid: self.eta for rid in request_ids if rid in self.late}

    def collect(self, request_ids, deadline_s, wait_for=None, defer=()):
        return {}

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n


def test_a_request_is_never_parked_more_than_max_park_steps_in_a_row():
    intake = Intake("adaptive", 0.2, max_park_steps=2)
    intake._step.add(STEP)
    for _ in range(5):
        intake.observe("a", 4)  # τ = 4
    hub = FakeHub(eta=0.008, late={"a"})
    parks = []
    for _ in range(9):
        intake._end = None  # keep the step time at STEP (this loop takes no time)
        batch = [rid for rid in ("a", "b", "c") if rid not in intake.parked]
        _, park = intake.gather(hub, batch, len(batch))
        parks.append("a" in park)
    # parked, parked, then back in the batch (plain), and so on: never 3 in a row
    assert parks[:3] == [True, True, False]
    assert not any(all(parks[i:i + 3]) for i in range(len(parks) - 2))
    assert hub.counters["intake_parks"] >= 6 and hub.counters["intake_parked_plain"] >= 2


def test_tokens_per_draft_starts_at_the_prior_and_follows_measurements():
    intake = Intake("adaptive", 0.05, 2)
    assert intake.gain_tokens("x") == PRIOR_TOKENS_PER_DRAFT - 1
    intake.observe("a", 5)
    assert intake.gain_tokens("a") == 4 and intake.gain_tokens("new") == 4  # edge-wide prior
    intake.forget("a")
    assert "a" not in intake._tokens


def test_intake_options_are_validated_naming_the_option():
    assert TsltConfig().intake == "wait"
    assert TsltConfig.from_dict({"intake": "adaptive", "intake_max_park_steps": "3"}
                                ).intake_max_park_steps == 3
    with pytest.raises(TsltConfigError, match=r"speculative_config\.intake:"):
        TsltConfig(intake="sometimes")
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(TsltConfigError, match=r"speculative_config\.intake_max_park_steps"):
            TsltConfig(intake_max_park_steps=bad)


def test_verifying_a_draft_costs_the_whole_batch():
    # g = 2 tokens of a 10 ms step gain 20 ms; waiting 8 ms for 1 request costs 8: worth 12 ms
    # request-seconds without verification cost. At 1.5 ms per draft token a 4-token draft costs
    # the one running request 6 ms (14 - 8 = 6 > 0: still waits); at 4 ms it costs 16 (no wait).
    pending = [Pending("a", 0.008, 2.0, draft_tokens=4)]
    free = decide_intake(pending, costs(running=1, batch=1))
    assert free.wait_for == {"a"} and free.value_s == pytest.approx(0.020 - 0.008)
    cheap = decide_intake(pending, IntakeCosts(STEP, 1, 1, 0.2, 2, "adaptive", 0.0015))
    assert cheap.wait_for == {"a"} and cheap.value_s == pytest.approx(0.020 - 0.006 - 0.008)
    dear = decide_intake(pending, IntakeCosts(STEP, 1, 1, 0.2, 2, "adaptive", 0.004))
    assert dear.wait_for == set() and dear.wait_s == 0.0
    # A park's verification step is longer for every running request too: 3 running, 1 ms per
    # token, 4 tokens: 12 ms against (3 - 1)·10 = 20: parks (value 8 ms); at 2 ms per token: no.
    three = [Pending("a", 0.008, 3.0, draft_tokens=4)]
    park = decide_intake(three, IntakeCosts(STEP, 3, 3, 0.2, 2, "adaptive", 0.001))
    assert park.park == {"a"} and park.value_s == pytest.approx(0.008)
    assert decide_intake(three, IntakeCosts(STEP, 3, 3, 0.2, 2, "adaptive", 0.002)).park == set()


class DraftOf:
    """What the hub hands out: only `gamma` matters to the intake."""

    def __init__(self, gamma):
        self.gamma = gamma


class ArrivingHub(FakeHub):
    """Every request's draft is in flight (due in `eta`) and arrives when collected."""

    def __init__(self, eta, gamma):
        super().__init__(eta, late=set())
        self.gamma, self.seen = gamma, []

    def in_flight(self, request_ids):
        return {rid: self.eta for rid in request_ids}

    def collect(self, request_ids, deadline_s, wait_for=None, defer=()):
        self.seen.append((deadline_s, frozenset(wait_for or ())))
        return {rid: DraftOf(self.gamma) for rid in wait_for or ()}


def test_gather_takes_the_engines_fitted_step_cost_and_the_last_draft_length():
    intake = Intake("adaptive", 0.2, max_park_steps=0)
    for _ in range(3):
        intake.observe("a", 3)  # τ = 3: g = 2
    hub = ArrivingHub(eta=0.008, gamma=4)
    # No step cost given and no step measured: waits as `intake: wait` does (the first step).
    intake.gather(hub, ["a"], 1)
    assert hub.seen[-1] == (0.2, {"a"}) and intake._draft_len["a"] == 4
    # Fitted step 10 ms, 1 ms per draft token: 2·10 - 4·1 - 8 > 0: waits for it.
    intake._end = None
    intake.gather(hub, ["a"], 1, step_cost=(STEP, 0.001))
    assert hub.seen[-1][1] == {"a"}
    # 4 ms per draft token: the 4-token draft costs more than it gains: decoded plainly.
    intake._end = None
    intake.gather(hub, ["a"], 1, step_cost=(STEP, 0.004))
    assert hub.seen[-1] == (0.0, set())
    intake.forget("a")
    assert "a" not in intake._draft_len


def test_a_shuffled_request_takes_every_choice_within_the_limits():
    """The test-only shuffle (the statistical e2e test's driver): wait, park and plain each
    happen, parks stay within max_park_steps, the next step is never emptied, and requests that
    are not shuffled keep the policy's choice."""
    intake = Intake("adaptive", 0.2, max_park_steps=2)
    intake._step.add(STEP)
    intake.shuffle("a", 7)
    hub = FakeHub(eta=5.0, late={"a", "b"})  # b's draft is far off: the policy decodes it plainly
    seen, parked_run = {"wait": 0, "park": 0, "plain": 0}, 0
    for _ in range(200):
        intake._end = None
        batch = [rid for rid in ("a", "b", "c") if rid not in intake.parked]
        _, park = intake.gather(hub, batch, len(batch))
        d = intake.last_decision
        assert "b" not in d.wait_for and "b" not in park
        if "a" in d.wait_for:
            seen["wait"] += 1
            assert d.wait_s == 0.2
        elif "a" in park:
            seen["park"] += 1
        else:
            seen["plain"] += 1
        parked_run = parked_run + 1 if "a" in park else 0
        assert parked_run <= 2
    assert min(seen.values()) >= 30, seen
    # Alone in the batch, a park would empty the next step: it decodes plainly instead.
    alone = Intake("adaptive", 0.2, max_park_steps=2)
    alone._step.add(STEP)
    alone.shuffle("a", 1)
    for _ in range(50):
        alone._end = None
        assert alone.gather(FakeHub(eta=5.0, late={"a"}), ["a"], 1)[1] == []
    alone.forget("a")
    assert "a" not in alone._shuffled


def test_the_shuffle_keeps_the_policys_parks_and_is_off_in_wait_mode():
    # b's draft is 8 ms away and three requests run: the policy parks b (see above). a is
    # shuffled; whatever it draws, b stays parked, and a park of a never empties the step.
    intake = Intake("adaptive", 0.2, max_park_steps=4)
    intake._step.add(STEP)
    for _ in range(5):
        intake.observe("b", 3)
    intake.shuffle("a", 3)
    for _ in range(30):
        intake._end, intake.parked = None, {}
        _, park = intake.gather(FakeHub(eta=0.008, late={"a", "b"}), ["a", "b", "c"], 3)
        assert "b" in park and "c" not in park
        # With c finishing this step (2 run on), parking both a and b would empty the next one.
        intake._end, intake.parked = None, {}
        _, park = intake.gather(FakeHub(eta=0.008, late={"a", "b"}), ["a", "b"], 2)
        assert len(park) < 2  # someone runs
    waiting = Intake("wait", 0.2, max_park_steps=4)
    waiting.shuffle("a", 3)
    for _ in range(10):
        _, park = waiting.gather(FakeHub(eta=0.008, late={"a", "b"}), ["a", "b"], 2)
        assert park == [] and waiting.last_decision.wait_for == {"a", "b"}
