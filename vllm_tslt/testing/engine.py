"""A batched fake engine: the real DraftHub, the reference verifiers, no vLLM.

``BatchEngine`` plays vLLM's part the way the proposer drives the hub (vllm_tslt/edge/proposer.py):
it binds each admitted request (``start_request``); each step it collects drafts for every bound
request until the deadline (``collect``), verifies each draft against the target with the reference
rejection samplers (``vllm_tslt.core.verify_ref``) or decodes one token when there is none, commits
what it emitted (``commit``) and ends finished requests (``end_request``). The verifier's randomness
is its own generator, never seen by a device (DESIGN.md rule 4).

``run`` serves a list of jobs to completion; ``admit`` and ``step`` let a caller drive the loop
itself (scripts/soak.py keeps a number of requests in flight for a duration). Each step returns a
``StepRecord`` with the time spent in hub calls, so a caller can measure the proxy's overhead.

With an ``intake`` (vllm_tslt.edge.intake.Intake) the engine collects as the proposer does with
``speculative_config.intake``: the policy decides per step whom to wait for, and a parked request
is left out of the step, as vLLM's scheduler leaves it out (patches/scheduler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_tslt.core.rng import exponential_noise
from vllm_tslt.core.verify_ref import (
    chain_rejection_sample_ref,
    multi_candidate_rejection_sample_ref,
)
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.edge.intake import Intake
from vllm_tslt.protocol import Draft


@dataclass
class Job:
    request_id: str
    session_id: str | Callable[[], str]  # a callable is read when the request starts
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0


@dataclass
class _Active:
    job: Job
    seq: list[int]
    bound: bool

    @property
    def generated(self) -> int:
        return len(self.seq) - len(self.job.prompt)


@dataclass
class EngineStats:
    steps: int = 0
    drafted: dict[str, int] = field(default_factory=dict)  # request_id -> steps verified with a draft
    accepted: dict[str, int] = field(default_factory=dict)  # request_id -> accepted draft tokens
    draft_tokens: int = 0  # draft tokens verified (all requests)
    multi_candidate_steps: int = 0
    stepped: dict[str, int] = field(default_factory=dict)  # request_id -> steps it ran in
    parked: dict[str, int] = field(default_factory=dict)  # request_id -> steps left out (intake)
    waited: dict[str, int] = field(default_factory=dict)  # request_id -> steps that waited for it


@dataclass
class StepRecord:
    """What one engine step did."""

    finished: dict[str, list[int]]  # request_id -> output of each request finished this step
    tokens: int  # tokens emitted
    requests: int  # requests stepped
    drafted: int  # of which verified with a draft
    hub_s: float  # time in hub calls: admissions since the last step, collect (waiting included),
    # commits and ends


class BatchEngine:
    def __init__(self, hub: DraftHub, target: Any, deadline_s: float = 0.05, seed: int = 1234,
                 step_s: float = 0.0, intake: Intake | None = None) -> None:
        self.hub = hub
        self.intake = intake
        self.target = target  # .probs(seq, n) -> [n, V]; see vllm_tslt.testing.targets
        self.deadline_s = deadline_s
        self.step_s = step_s  # emulated extra time per engine step (a bigger target)
        self.gen = torch.Generator().manual_seed(seed)
        self.stats = EngineStats()
        self.active: dict[str, _Active] = {}
        self._hub_s = 0.0  # hub time of admissions not yet reported by a step

    def run(self, jobs: Iterable[Job], concurrency: int = 1,
            on_step: Callable[[int], None] | None = None) -> dict[str, list[int]]:
        """Run every job to max_tokens, at most `concurrency` at a time. Returns the outputs."""
        pending = list(jobs)
        outputs: dict[str, list[int]] = {}
        while pending or self.active:
            while pending and len(self.active) < concurrency:
                self.admit(pending.pop(0))
            outputs.update(self.step().finished)
            if on_step is not None:
                on_step(self.stats.steps)
        return outputs

    def admit(self, job: Job) -> bool:
        """Start a request; True if the hub bound it to its device session."""
        session = job.session_id() if callable(job.session_id) else job.session_id
        params = {"temperature": job.temperature, "top_p": 1.0, "top_k": 0, "seed": None,
                  "max_tokens": job.max_tokens, "max_gamma": self.hub.max_gamma}
        t0 = time.perf_counter()
        bound = bool(session) and self.hub.start_request(job.request_id, session, job.prompt,
                                                         params)
        self._hub_s += time.perf_counter() - t0
        self.active[job.request_id] = _Active(job, list(job.prompt), bound)
        return bound

    def step(self) -> StepRecord:
        """One engine step over every active request."""
        hub_s, self._hub_s = self._hub_s, 0.0
        bound = [rid for rid, a in self.active.items() if a.bound]
        t0 = time.perf_counter()
        drafts, park = self._collect(bound)
        hub_s += time.perf_counter() - t0
        time.sleep(self.step_s)
        self.stats.steps += 1
        record = StepRecord({}, 0, len(self.active) - len(park), len(drafts), 0.0)
        for rid in list(self.active):
            if rid in park:
                self.stats.parked[rid] = self.stats.parked.get(rid, 0) + 1
                continue
            self.stats.stepped[rid] = self.stats.stepped.get(rid, 0) + 1
            a = self.active[rid]
            emitted = self._verify(a, drafts.get(rid))
            if self.intake is not None and rid in drafts:
                self.intake.observe(rid, len(emitted))
            emitted = emitted[: a.job.max_tokens - a.generated]
            a.seq += emitted
            record.tokens += len(emitted)
            t1 = time.perf_counter()
            if a.bound:
                verified = drafts[rid].gamma if rid in drafts else 0
                self.hub.commit(rid, len(a.seq), emitted, min(verified, self.hub.max_gamma))
            if a.generated >= a.job.max_tokens:
                self.hub.end_request(rid, "finished")
                if self.intake is not None:
                    self.intake.forget(rid)
                record.finished[rid] = a.seq[len(a.job.prompt):]
                del self.active[rid]
            hub_s += time.perf_counter() - t1
        record.hub_s = hub_s
        return record

    def _collect(self, bound: list[str]) -> tuple[dict[str, Draft], list[str]]:
        """This step's drafts and the requests parked out of it."""
        if self.intake is None:
            return (self.hub.collect(bound, self.deadline_s) if bound else {}), []
        # The step just finished ran every active request but the ones parked out of it.
        ran = [rid for rid in self.active if rid not in self.intake.parked]
        batch = [rid for rid in bound if rid not in self.intake.parked]
        if not batch and not self.intake.parked:
            return {}, []
        drafts, park = self.intake.gather(self.hub, batch, len(ran))
        for rid in self.intake.last_decision.wait_for:
            self.stats.waited[rid] = self.stats.waited.get(rid, 0) + 1
        return drafts, park

    def _verify(self, a: _Active, draft: Draft | None) -> list[int]:
        greedy = a.job.temperature == 0
        if draft is None:
            p = self.target.probs(a.seq, 1)[0]
            if greedy:
                return [int(p.argmax())]
            return [int(torch.argmax(p / exponential_noise(self.gen, p.shape)))]
        gamma = min(draft.gamma, self.hub.max_gamma)
        cands = draft.candidates()[:gamma]  # [γ, m]: spine first, then alternatives in draw order
        probs = self.target.probs(a.seq + cands[:, 0].tolist(), gamma + 1)  # [γ + 1, V]
        uniforms = torch.rand(gamma, cands.shape[1], dtype=torch.float64, generator=self.gen)
        noise = exponential_noise(self.gen, (probs.shape[1],))
        q = draft.q.rows(0, gamma)
        if cands.shape[1] > 1:
            self.stats.multi_candidate_steps += 1
            emitted = multi_candidate_rejection_sample_ref(probs, cands, q, uniforms, noise, greedy)
        else:
            emitted = chain_rejection_sample_ref(probs, cands[:, 0], q, uniforms[:, 0], noise,
                                                 greedy)
        rid = a.job.request_id
        self.stats.drafted[rid] = self.stats.drafted.get(rid, 0) + 1
        self.stats.draft_tokens += gamma
        accepted = 0
        for x, y in zip(emitted[:-1], cands[:, 0].tolist()):  # the last token is never a draft's
            if x != y:
                break
            accepted += 1
        self.stats.accepted[rid] = self.stats.accepted.get(rid, 0) + accepted
        return emitted
