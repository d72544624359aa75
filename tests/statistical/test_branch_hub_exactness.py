"""Exactness with send-ahead branches through the real DraftHub (issue 14 item 2).

Setup (as tests/reliability/test_hostile_exactness.py): the real DraftHub on loopback, the fake
engine (``BatchEngine``: reference rejection sampler, its own randomness) and ``TableTarget``
(V = 8, exact 3-token continuation probabilities). One scripted device drafts like the agent:
per-position uniforms ``position_uniforms(seed, [t])`` (one random seed per request), γ = 2, and
for every draft in flight it sends the main chain's send-ahead (all accepted + its sampled bonus
guess) and the branches the agent's rule picks (``plan_branches``, budget 4). On a commit that a
draft it sent already covers, it sends nothing for that prefix: the step's draft must be the one
the hub kept pending under (committed_len, prefix_hash) and promoted at the commit.

Bound: chi-square goodness of fit of the 3-token continuations of one prompt against the exact
target probabilities (cells with expected count >= 5, the rest merged): p > 1e-4, N = 1500, fixed
seeds (thread timing decides which drafts arrive before a commit, which exactness does not depend
on). This test checks the hub's store and promotion end to end; the power against wrong-prefix
use is in test_branch_exactness.py (N = 200 000, negative control).
"""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

from vllm_tslt.agent.branches import plan_branches
from vllm_tslt.core.rng import position_uniforms
from vllm_tslt.core.sparsify import SparseQ, SparsifyConfig, sparsify_then_sample
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import Draft, prefix_hash
from vllm_tslt.testing.engine import BatchEngine, Job
from vllm_tslt.testing.peers import FINGERPRINT, ScriptedPeer
from vllm_tslt.testing.targets import TableTarget

pytestmark = [pytest.mark.statistical, pytest.mark.integration]

ALPHA = 1e-4
V = 8
GAMMA = 2
BUDGET = 4
PROMPT = [3, 5, 1]
LENGTH = 3
N = 1500
CFG = SparsifyConfig(top_k=6, quant_bits=10)


class BranchingDevice(ScriptedPeer):
    def __init__(self, endpoint: str, draft: TableTarget, seed: int) -> None:
        super().__init__(endpoint, V, "branching")
        self.draft = draft
        self.rng = random.Random(seed)
        self.seeds: dict[int, int] = {}
        self.sent: dict[int, dict[tuple[int, ...], tuple[list[int], list]]] = {}  # per request
        self.counts = {"drafts": 0, "branches": 0, "covered": 0}

    def draw(self, handle: int, seq: list[int], n: int) -> tuple[list[int], list]:
        """n tokens after seq, token t drawn with position_uniforms(seed, [t]) from q̃(· | ...)."""
        seed = self.seeds.setdefault(handle, self.rng.getrandbits(62))
        ctx, tokens, rows = list(seq), [], []
        for _ in range(n):
            logits = torch.log(self.draft.next_probs(ctx)).float().view(1, -1)
            tok, q = sparsify_then_sample(logits, CFG, position_uniforms(seed, [len(ctx)]))
            width = int(q.support_sizes()[0])
            tokens.append(int(tok[0, 0]))
            rows.append((q.indices[0, :width], q.counts[0, :width]))
            ctx.append(int(tok[0, 0]))
        return tokens, rows

    def ship(self, handle: int, prefix: list[int], tokens: list[int], rows: list) -> None:
        q = SparseQ.from_rows(rows[:GAMMA], CFG.quant_bits)
        self.send(Draft(handle, len(prefix), prefix_hash(prefix), torch.tensor(tokens[:GAMMA]), q))
        self.sent.setdefault(handle, {})[tuple(prefix)] = (tokens, rows)

    def on_context(self, handle: int) -> None:
        seq = self.context(handle)
        mine = self.sent.setdefault(handle, {})
        for key in [k for k in mine if len(k) < len(seq)]:
            del mine[key]
        if tuple(seq) in mine:  # a branch or send-ahead covered this prefix: the hub has it
            self.counts["covered"] += 1
            tokens, rows = mine[tuple(seq)]
        else:
            tokens, rows = self.draw(handle, seq, GAMMA + 1)  # + the bonus guess (row γ)
            self.ship(handle, seq, tokens, rows)
            self.counts["drafts"] += 1
        if len(rows) < GAMMA + 1:  # a branch's draft: its bonus guess, one position more
            more, more_rows = self.draw(handle, seq + tokens, GAMMA + 1 - len(rows))
            tokens, rows = tokens + more, rows + more_rows
        ahead = seq + tokens[:GAMMA + 1]  # all accepted + the sampled bonus guess
        outcomes = [seq + tokens[:j] + [t] for j, t in
                    plan_branches(rows, tokens, GAMMA, alpha=0.6, budget=BUDGET)]
        for prefix in [ahead, *outcomes]:
            if tuple(prefix) not in mine:
                drafted, drafted_rows = self.draw(handle, prefix, GAMMA)
                self.ship(handle, prefix, drafted, drafted_rows)
                self.counts["branches"] += 1

    def on_end(self, handle: int) -> None:
        self.sent.pop(handle, None)
        self.seeds.pop(handle, None)


def chi_square_p(samples: list[tuple[int, ...]], cells: dict[tuple[int, ...], float]) -> float:
    n = len(samples)
    keys = [k for k, p in cells.items() if p * n >= 5]
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    observed = [counts.get(k, 0) for k in keys] + [0]
    expected = [cells[k] * n for k in keys] + [0.0]
    observed[-1], expected[-1] = n - sum(observed), n - sum(expected)
    return float(chisquare(observed, expected).pvalue)


def test_branch_drafts_promoted_by_the_hub_keep_the_target_distribution():
    target = TableTarget(V, seed=0)
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=300), vocab_size=V,
                   vocab_fingerprint=FINGERPRINT, model_name="table", max_gamma=GAMMA).start()
    device = BranchingDevice(hub.endpoint, target.perturbed(0.7, seed=1), seed=9)
    try:
        device.start()
        engine = BatchEngine(hub, target, deadline_s=0.3, seed=4321)
        jobs = [Job(f"r{i}", device.session_id, PROMPT, LENGTH, 1.0) for i in range(N)]
        outputs = engine.run(jobs, concurrency=8)  # the device keeps up with 8 (deadline 300 ms)
        assert device.error is None, device.error
        snap = hub.snapshot()
    finally:
        device.stop()
        hub.close()
    drafted = sum(engine.stats.drafted.values())
    print(f"device {device.counts}, hub ahead: "
          f"{ {k: v for k, v in snap.items() if k.startswith('drafts_')} }, "
          f"{drafted} drafted of {engine.stats.steps} steps")
    # Non-vacuous: many steps ran on a draft the hub promoted from its pending store. (The
    # device's own "covered" count is lower: after a hit the engine does not wait for it, so it
    # often sees two commits at once and never drafts for the round in between.)
    assert snap["drafts_ahead_hits"] > N // 3, snap
    assert drafted > N
    p = chi_square_p([tuple(o) for o in outputs.values()],
                     target.continuation_probs(PROMPT, LENGTH))
    print(f"chi-square p = {p:.3g} over {len(outputs)} requests")
    assert p > ALPHA, f"branch drafts changed the output distribution: p = {p:.3g}"
