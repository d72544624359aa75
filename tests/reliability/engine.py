"""A batched fake engine for the reliability tests: the real DraftHub, the reference verifiers, no vLLM.

``BatchEngine`` plays vLLM's part the way the proposer drives the hub (vllm_tslt/edge/proposer.py):
each step it binds new requests (``start_request``), collects drafts for every active request until
the deadline (``collect``), verifies each draft against the target with the reference rejection
samplers (``vllm_tslt.core.verify_ref``) or decodes one token when there is none, commits what it
emitted, and ends finished requests (``end_request``). The verifier's randomness is its own
generator, never seen by a device (DESIGN.md rule 4).

Targets: ``TableTarget`` (a synthetic model, next-token logits from a fixed random table indexed by
position and last token: cheap, and its exact continuation probabilities are known) and
``HFTarget`` (a transformers causal LM, e.g. the tiny pair's target).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_tslt.core.rng import exponential_noise
from vllm_tslt.core.verify_ref import (
    chain_rejection_sample_ref,
    multi_candidate_rejection_sample_ref,
)
from vllm_tslt.edge.hub import DraftHub


class TableTarget:
    """p(next | seq) = softmax(table[len(seq) % periods, seq[-1]])."""

    def __init__(self, vocab_size: int = 64, periods: int = 3, scale: float = 3.0,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.periods = periods
        logits = torch.randn(periods, vocab_size, vocab_size, generator=g) * scale
        self.table = torch.softmax(logits.double(), dim=-1)  # [periods, V, V] float64

    def next_probs(self, seq: list[int]) -> torch.Tensor:
        """[vocab_size] float64 exact next-token probabilities."""
        return self.table[len(seq) % self.periods, seq[-1]]

    def probs(self, seq: list[int], n: int) -> torch.Tensor:
        """[n, vocab_size] float32: next-token probabilities after each of the last n prefixes."""
        rows = [self.next_probs(seq[: len(seq) - n + 1 + i]) for i in range(n)]
        return torch.stack(rows).float()

    def continuation_probs(self, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
        """Exact probability of every `length`-token continuation (all V**length of them)."""
        cells: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(length):
            nxt: dict[tuple[int, ...], float] = {}
            for seq, p in cells.items():
                row = self.next_probs(prompt + list(seq))
                for t in range(self.vocab_size):
                    nxt[(*seq, t)] = p * float(row[t])
            cells = nxt
        return cells

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        seq = list(prompt)
        for _ in range(max_tokens):
            seq.append(int(self.next_probs(seq).argmax()))
        return seq[len(prompt):]


class HFTarget:
    """A transformers causal LM as the target (full recompute per call; small models only)."""

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)

    @torch.inference_mode()
    def probs(self, seq: list[int], n: int) -> torch.Tensor:
        logits = self.model(input_ids=torch.tensor([seq])).logits[0, -n:].float()
        return torch.softmax(logits, dim=-1)

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        seq = list(prompt)
        for _ in range(max_tokens):
            seq.append(int(self.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(prompt):]


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


@dataclass
class EngineStats:
    steps: int = 0
    drafted: dict[str, int] = field(default_factory=dict)  # request_id -> steps verified with a draft
    accepted: dict[str, int] = field(default_factory=dict)  # request_id -> accepted draft tokens
    multi_candidate_steps: int = 0


class BatchEngine:
    def __init__(self, hub: DraftHub, target, deadline_s: float = 0.05, seed: int = 1234,
                 step_s: float = 0.0) -> None:
        self.hub = hub
        self.target = target
        self.deadline_s = deadline_s
        self.step_s = step_s  # emulated extra time per engine step (a bigger target)
        self.gen = torch.Generator().manual_seed(seed)
        self.stats = EngineStats()

    def run(self, jobs: list[Job], concurrency: int = 1,
            on_step: Callable[[int], None] | None = None) -> dict[str, list[int]]:
        """Run every job to max_tokens, at most `concurrency` at a time. Returns the outputs."""
        pending = list(jobs)
        active: dict[str, _Active] = {}
        outputs: dict[str, list[int]] = {}
        while pending or active:
            while pending and len(active) < concurrency:
                self._start(pending.pop(0), active)
            bound = [rid for rid, a in active.items() if a.bound]
            drafts = self.hub.collect(bound, self.deadline_s) if bound else {}
            time.sleep(self.step_s)
            self.stats.steps += 1
            for rid in list(active):
                a = active[rid]
                emitted = self._verify(a, drafts.get(rid))
                emitted = emitted[: a.job.max_tokens - (len(a.seq) - len(a.job.prompt))]
                a.seq += emitted
                if a.bound:
                    self.hub.commit(rid, len(a.seq), emitted)
                if len(a.seq) - len(a.job.prompt) >= a.job.max_tokens:
                    self.hub.end_request(rid, "finished")
                    outputs[rid] = a.seq[len(a.job.prompt):]
                    del active[rid]
            if on_step is not None:
                on_step(self.stats.steps)
        return outputs

    def _start(self, job: Job, active: dict[str, _Active]) -> None:
        session = job.session_id() if callable(job.session_id) else job.session_id
        params = {"temperature": job.temperature, "top_p": 1.0, "top_k": 0, "seed": None,
                  "max_tokens": job.max_tokens, "max_gamma": self.hub.max_gamma}
        bound = bool(session) and self.hub.start_request(job.request_id, session, job.prompt,
                                                         params)
        active[job.request_id] = _Active(job, list(job.prompt), bound)

    def _verify(self, a: _Active, draft) -> list[int]:
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
        accepted = 0
        for x, y in zip(emitted[:-1], cands[:, 0].tolist()):  # the last token is never a draft's
            if x != y:
                break
            accepted += 1
        self.stats.accepted[rid] = self.stats.accepted.get(rid, 0) + accepted
        return emitted
