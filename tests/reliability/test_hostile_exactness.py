"""Exactness while hostile devices send valid-format adversarial drafts (issue 8, part 3's last item).

Setup: the real DraftHub on loopback, ``BatchEngine`` (reference rejection samplers, its own
randomness) and a synthetic target (``TableTarget``: V = 64, next-token logits from a fixed random
table by position and last token, scale 3: peaky, context-dependent, and its exact 3-token
continuation probabilities are known). Two device sessions run at the same time:

- **A, adversarial but honest**: a device that knows the target and sends the worst q̃ it can think
  of — mass on the tokens the target dislikes, one spike plus many 2^-16 "near-zero" masses, the
  largest support (K = 64 = V), an exact uniform, max γ, four i.i.d. candidates per position,
  replayed old drafts, drafts with a wrong prefix hash, drafts for guessed future prefixes — but
  always samples its draft tokens from the very q̃ it sends (DESIGN.md rule 1).
- **B, lying**: drafts the target's 4th most likely token and claims q̃ = 2^-16 for it, so the edge
  accepts it almost surely (docs/security.md: a device can bias its *own* requests this way). It
  also learns A's request ids and committed sequences (an oracle: worst case) and sends the same
  lying drafts for A's requests, with the right length and prefix hash.

Bound: chi-square goodness of fit of the 3-token continuations of one prompt against the exact
target probabilities (cells with expected count >= 5, the rest merged): A's p-value must be > 1e-4
(N = 1200); B's own requests must be rejected (p < 1e-4, negative control: the test has power
against exactly the bias B would carry into A if the hub let its drafts through). Seeds are fixed;
thread timing decides which drafts arrive before the deadline, which exactness does not depend on,
so a correct system fails A's bound with probability 1e-4 per run.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from scipy.stats import chisquare

from vllm_tslt.core.sparsify import SparseQ, quantize_masses, sample_from_sparse
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import Draft, prefix_hash
from vllm_tslt.testing.engine import BatchEngine, Job
from vllm_tslt.testing.peers import FINGERPRINT, ScriptedPeer
from vllm_tslt.testing.targets import TableTarget

pytestmark = [pytest.mark.statistical, pytest.mark.integration]

ALPHA = 1e-4
V = 64
MAX_GAMMA = 4
PROMPT = [7, 21, 3]
LENGTH = 3  # tokens per request (the chi-square cell is the whole continuation)
N_HONEST = 1200
N_GREEDY = 40
N_LIAR = 300
DEADLINE_MS = 300  # generous: collect returns as soon as every responsive request has its draft


# ----------------------------------------------------------------------------------------------
# q̃ builders: one row [V] of target probabilities in, one SparseQ row out (ascending indices)
# ----------------------------------------------------------------------------------------------


def _row(indices: torch.Tensor, counts: torch.Tensor, bits: int) -> SparseQ:
    order = torch.argsort(indices)
    return SparseQ(indices[order].to(torch.int32).view(1, -1),
                   counts[order].to(torch.int32).view(1, -1), bits)


def _quantized(indices: torch.Tensor, masses: torch.Tensor, bits: int) -> SparseQ:
    keep = torch.ones(1, indices.numel(), dtype=torch.bool)
    return _row(indices, quantize_masses(masses.double().view(1, -1), keep, bits)[0], bits)


def q_anti(p: torch.Tensor, g: torch.Generator) -> SparseQ:
    """Random masses on the 8 tokens the target likes least."""
    idx = torch.argsort(p)[:8]
    return _quantized(idx, torch.rand(8, generator=g) + 0.05, 12)


def q_spike(p: torch.Tensor, g: torch.Generator) -> SparseQ:
    """2^16 - 31 of 2^16 on the target's least likely token, 1 on each of its 31 favourites."""
    order = torch.argsort(p, descending=True)
    idx = torch.cat([order[:31], order[-1:]])
    counts = torch.ones(32, dtype=torch.int64)
    counts[-1] = (1 << 16) - 31
    return _row(idx, counts, 16)


def q_wide(p: torch.Tensor, g: torch.Generator) -> SparseQ:
    """Support = the whole vocabulary (K = 64 = max_k), random masses, 16-bit counts."""
    return _quantized(torch.arange(V), torch.rand(V, generator=g) ** 4 + 1e-3, 16)


def q_uniform(p: torch.Tensor, g: torch.Generator) -> SparseQ:
    """The exact uniform: count 1 of 2^6 on every token."""
    return _row(torch.arange(V), torch.ones(V, dtype=torch.int64), 6)


def q_copy(p: torch.Tensor, g: torch.Generator) -> SparseQ:
    """The target itself, top-16 at 12 bits (high acceptance: exercises bonus tokens)."""
    idx = torch.argsort(p, descending=True)[:16]
    return _quantized(idx, p[idx], 12)


BUILDERS = {"anti": q_anti, "spike": q_spike, "wide": q_wide, "uniform": q_uniform,
            "copy": q_copy}


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------


class AdversarialHonestDevice(ScriptedPeer):
    def __init__(self, endpoint: str, target: TableTarget, seed: int) -> None:
        super().__init__(endpoint, V, "adversarial")
        self.target = target
        self.rng = random.Random(seed)  # the device's choices: never the verifier's randomness
        self.gen = torch.Generator().manual_seed(seed)
        self.history: dict[str, list[Draft]] = {}

    def draft(self, request_id: str, seq: list[int], gamma: int, build, m: int) -> Draft:
        ctx, tokens, alts, rows = list(seq), [], [], []
        for _ in range(gamma):
            q = build(self.target.next_probs(ctx), self.gen)
            u = torch.rand(1, m, dtype=torch.float64, generator=self.gen)
            cand = sample_from_sparse(q, u)[0]  # [m]: i.i.d. draws from exactly this q̃
            tokens.append(int(cand[0]))
            alts.append(cand[1:])
            rows.append(q)
            ctx.append(int(cand[0]))
        return Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens),
                     SparseQ.concat(rows), torch.stack(alts) if m > 1 else None)

    def on_context(self, request_id: str) -> None:
        seq = self.context(request_id)
        rng = self.rng
        name = rng.choice(list(BUILDERS))
        gamma = MAX_GAMMA if rng.random() < 0.5 else rng.randint(1, MAX_GAMMA)
        m = 4 if rng.random() < 0.2 else 1
        draft = self.draft(request_id, seq, gamma, BUILDERS[name], m)
        history = self.history.setdefault(request_id, [])
        if history and rng.random() < 0.2:  # replay an old draft (conditioned on a shorter prefix)
            self.send(rng.choice(history), "replayed")
        wrong = dataclasses.replace(draft, prefix_hash=draft.prefix_hash ^ 0x5A5A)
        if rng.random() < 0.1:  # the right length with a wrong prefix hash, then the real one
            self.send(wrong, "wrong_hash")
        self.send(draft, f"{name}_m{m}_g{gamma}")
        if rng.random() < 0.005:  # ... or after it: the last word is wrong, a step without draft
            self.send(wrong, "wrong_hash_last")
        if rng.random() < 0.3:  # ahead: a draft for a guessed next token, sampled honestly too
            guess = int(torch.multinomial(self.target.next_probs(seq), 1, generator=self.gen))
            ahead = [*seq, guess]
            self.send(self.draft(request_id, ahead, MAX_GAMMA, q_anti, 1), "ahead")
        history.append(draft)

    def on_end(self, request_id: str) -> None:
        self.history.pop(request_id, None)


class LyingDevice(ScriptedPeer):
    """Drafts the target's 4th favourite token, claims q̃ = 2^-16 for it (not a sample from q̃)."""

    def __init__(self, endpoint: str, target: TableTarget, victim: ScriptedPeer) -> None:
        super().__init__(endpoint, V, "liar")
        self.target = target
        self.victim = victim
        self.injected: set[tuple[str, int]] = set()

    def lie(self, request_id: str, seq: list[int]) -> Draft:
        ctx, tokens, rows = list(seq), [], []
        for _ in range(MAX_GAMMA):
            top = torch.argsort(self.target.next_probs(ctx), descending=True)[:16]
            counts = torch.full((16,), ((1 << 16) - 1) // 15, dtype=torch.int64)
            counts[3] = 1
            rows.append(_row(top, counts, 16))
            tokens.append(int(top[3]))
            ctx.append(int(top[3]))
        return Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens),
                     SparseQ.concat(rows))

    def on_context(self, request_id: str) -> None:
        self.send(self.lie(request_id, self.context(request_id)), "own")

    def tick(self) -> None:
        for rid, seq in self.victim.snapshot().items():  # oracle: the victim's exact state
            if (rid, len(seq)) not in self.injected:
                self.injected.add((rid, len(seq)))
                self.send(self.lie(rid, seq), "injected")


# ----------------------------------------------------------------------------------------------
# The experiment (run once) and its assertions
# ----------------------------------------------------------------------------------------------


def chi_square_p(samples: list[tuple[int, ...]], cells: dict[tuple[int, ...], float]) -> float:
    n = len(samples)
    keys = [k for k, p in cells.items() if p * n >= 5]
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    observed = [counts.get(k, 0) for k in keys]
    expected = [cells[k] * n for k in keys]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    return float(chisquare(observed, expected).pvalue)


@pytest.fixture(scope="module")
def experiment():
    target = TableTarget(V, seed=0)
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=DEADLINE_MS, max_k=64,
                              max_candidates=4),
                   vocab_size=V, vocab_fingerprint=FINGERPRINT, model_name="table",
                   max_gamma=MAX_GAMMA).start()
    honest = AdversarialHonestDevice(hub.endpoint, target, seed=5)
    liar = LyingDevice(hub.endpoint, target, honest)
    try:
        honest.start()
        liar.start()
        jobs = []
        for i in range(max(N_HONEST, N_LIAR)):  # interleaved: both sessions in every batch
            if i < N_HONEST:
                jobs.append(Job(f"a{i}", honest.session_id, PROMPT, LENGTH, 1.0))
            if i < N_LIAR:
                jobs.append(Job(f"b{i}", liar.session_id, PROMPT, LENGTH, 1.0))
            if i < N_GREEDY:
                jobs.append(Job(f"g{i}", honest.session_id, [i % V, (5 * i) % V], 8, 0.0))
        engine = BatchEngine(hub, target, deadline_s=DEADLINE_MS / 1000, seed=1234)
        outputs = engine.run(jobs, concurrency=48)
        assert honest.error is None and liar.error is None, (honest.error, liar.error)
        yield {"target": target, "outputs": outputs, "jobs": jobs, "engine": engine,
               "hub": hub.snapshot(), "honest": honest, "liar": liar}
    finally:
        honest.stop()
        liar.stop()
        hub.close()


def _samples(experiment, prefix: str) -> list[tuple[int, ...]]:
    return [tuple(out) for rid, out in experiment["outputs"].items()
            if rid.startswith(prefix)]


def test_every_request_completes_and_greedy_equals_target(experiment):
    outputs, target = experiment["outputs"], experiment["target"]
    assert len(outputs) == len(experiment["jobs"])
    for job in experiment["jobs"]:
        out = outputs[job.request_id]
        assert len(out) == job.max_tokens and all(0 <= t < V for t in out)
        if job.temperature == 0:
            assert out == target.greedy(job.prompt, job.max_tokens), job.request_id
    assert experiment["hub"]["requests_active"] == 0


def test_adversarial_but_honest_drafts_keep_the_target_distribution(experiment):
    engine, hub, honest = experiment["engine"], experiment["hub"], experiment["honest"]
    drafted = sum(n for rid, n in engine.stats.drafted.items() if rid.startswith("a"))
    # The adversarial drafts were really verified, of every kind, and the junk was dropped.
    assert drafted > N_HONEST // 2, (drafted, hub)
    assert engine.stats.multi_candidate_steps > 20
    for name in BUILDERS:
        assert sum(v for k, v in honest.sent.items() if k.startswith(name)) > 100, honest.sent
    assert honest.sent["replayed"] > 50 and honest.sent["wrong_hash"] > 50
    assert hub["dropped_late"] > 0 and hub["dropped_stale"] > 0, hub
    p = chi_square_p(_samples(experiment, "a"),
                     experiment["target"].continuation_probs(PROMPT, LENGTH))
    print(f"adversarial-honest session: chi-square p = {p:.3g}, {drafted} drafted steps "
          f"({engine.stats.multi_candidate_steps} multi-candidate), sent {dict(honest.sent)}, "
          f"hub {hub}")
    assert p > ALPHA, f"adversarial but honest q̃ changed the output distribution: p = {p:.3g}"


def test_a_lying_device_biases_only_its_own_session(experiment):
    hub, liar = experiment["hub"], experiment["liar"]
    cells = experiment["target"].continuation_probs(PROMPT, LENGTH)
    p_own = chi_square_p(_samples(experiment, "b"), cells)
    p_victim = chi_square_p(_samples(experiment, "a"), cells)
    print(f"liar's own requests: p = {p_own:.3g}; the other session's: p = {p_victim:.3g}; "
          f"injected {liar.sent['injected']} drafts into it")
    # Negative control: the lie works on the liar's own requests, so the bound has power ...
    assert p_own < ALPHA, f"the lying device did not bias its own requests: p = {p_own:.3g}"
    # ... and its drafts for the other session's requests never reached the verifier.
    assert liar.sent["injected"] > N_HONEST, liar.sent
    assert hub["dropped_unknown_request"] >= liar.sent["injected"], hub
    assert p_victim > ALPHA, f"a lying device changed another session's outputs: p = {p_victim:.3g}"
