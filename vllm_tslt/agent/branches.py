"""Send-ahead branches: which verification outcomes the device drafts for before it knows them.

While the edge verifies a draft d = chain[:γ], the outcome is one of

- *rejected at j* (0 <= j < γ): the edge emits d[:j] + [c], c drawn from norm(max(0, p_j - q̃_j)),
  so c != d[j]; the device guesses c by q̃_j's most likely tokens other than d[j];
- *all accepted*: the edge emits d + [b], b drawn from p_γ; the device's chain already holds one
  guess (chain[γ], sampled from q̃_γ: the main chain's send-ahead), the branches add q̃_γ's most
  likely other tokens.

Each guess is a *branch*: a DraftState forked at the outcome's prefix (``Drafter.fork``) that drafts
γ tokens of its own and sends them tagged with that prefix; the hub uses it only if the prefix
comes true (vllm_tslt/edge/sessions.py).

**The selection rule is causal** (docs/exactness.md, "Send-ahead branches"): whether a branch at
level j is drafted may depend on the chain only up to position j (row q̃_j and d[j]); the number of
branches per level (``level_quotas``) depends on the history alone (α, γ, the budget). A rule that
compared levels by their tokens' masses (say, "level 1's best guess beats level 0's second") would
make the decision to send the level-0 branch depend on d[1], which was drawn with the very uniform
the level-0 branch draws its first token with: a selection bias. Tests:
tests/statistical/test_branch_exactness.py.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_tslt.agent.drafter import Drafter, DraftState

MAX_BRANCH_BUDGET = 8  # branches per round (the hub keeps MAX_PENDING_DRAFTS per request)
# "auto" budgets: at most this many. Branches cost device compute too (one batched extension of
# the chain and B branches costs ~3x a single one for B = 4 on a CPU, docs/benchmarks/branches/),
# which the uplink rule does not see; 2 had the best hit rate per uplink byte there. Issue 14
# item 3 (adaptive control of γ and the budget) is where a compute-aware choice belongs.
AUTO_BRANCH_CAP = 2


@dataclass
class Branch:
    """A forked state drafting for one outcome of the verification in flight."""

    state: DraftState  # committed_len = the length of the prefix it assumes
    gamma: int
    sent: Any = None  # the runtime's SentDraft once sent


def level_quotas(alpha: float, gamma: int, budget: int) -> list[int]:
    """Branches per outcome level [γ + 1]: level j < γ = rejected at j, level γ = all accepted.

    The i-th guess (0-based) at level j has prior weight w_j · 2^-i, with w_j = α^j (1 - α)
    (rejected at j) and w_γ = α^γ (all accepted; its sampled guess is the main chain, so the
    branches start at i = 1). The ``budget`` largest weights win. Depends on α, γ and the budget
    only, never on drafted tokens (the module doc says why).
    """
    if budget <= 0 or gamma <= 0:
        return [0] * (gamma + 1)
    a = min(max(float(alpha), 0.0), 1.0)
    weights = [a ** j * (1.0 - a) for j in range(gamma)] + [a ** gamma]
    # (-weight, level, rank): ties go to the earlier level, then the better rank.
    heap = [(-w * (0.5 if j == gamma else 1.0), j, 0) for j, w in enumerate(weights)]
    heapq.heapify(heap)
    quotas = [0] * (gamma + 1)
    for _ in range(budget):
        neg, j, i = heapq.heappop(heap)
        quotas[j] += 1
        heapq.heappush(heap, (neg * 0.5, j, i + 1))
    return quotas


def guess_tokens(indices: torch.Tensor, counts: torch.Tensor, exclude: int, quota: int) -> list[int]:
    """The ``quota`` most likely tokens of one q̃ row other than ``exclude``.

    indices [k] int, counts [k] (integer counts, or a baseline format's values: one row as the
    drafter stores it). Tokens without mass are never guessed; ties go to the smaller id.
    """
    if quota <= 0:
        return []
    order = sorted(zip((-float(c) for c in counts.tolist()), (int(i) for i in indices.tolist())))
    return [tok for neg, tok in order if tok != exclude and neg < 0][:quota]


def plan_branches(rows: list[tuple[torch.Tensor, torch.Tensor]], chain: list[int], gamma: int,
                  alpha: float, budget: int) -> list[tuple[int, int]]:
    """(level j, token) of every branch to draft for a draft chain[:γ] now being verified.

    ``rows``: the chain's q̃ rows (indices, counts), row γ being the bonus guess's; ``chain``:
    the chain tokens. Levels 0..min(len(rows), len(chain), γ + 1) - 1 are planned, so a caller
    can plan the rejection levels as soon as the draft is out and the bonus level one forward
    later (the plan of a level does not change when later rows arrive). A branch (j, t) assumes
    the edge commits chain[:j] + [t]. Level j uses rows[:j + 1] and chain[:j + 1] only (causal;
    module doc): its quota, plus what narrower rows before it left unused, goes to row j's best
    guesses.
    """
    quotas = level_quotas(alpha, gamma, min(budget, MAX_BRANCH_BUDGET))
    levels = min(len(rows), len(chain), gamma + 1)
    plan: list[tuple[int, int]] = []
    carry = 0  # quota a narrow row could not use passes to the next level (never to an earlier)
    for j, quota in enumerate(quotas[:levels]):
        indices, counts = rows[j]
        guesses = guess_tokens(indices, counts, chain[j], quota + carry)
        carry = quota + carry - len(guesses)
        plan += [(j, t) for t in guesses]
    return plan


def fork_branches(drafter: Drafter, state: DraftState, plan: list[tuple[int, int]],
                  gamma_of: Callable[[int], int]) -> list[Branch]:
    """One Branch per planned (level j, token): ``state`` forked at committed_len + j with the
    token appended, drafting ``gamma_of(keep)`` tokens (branches with fewer than 1 are skipped)."""
    out = []
    for j, token in plan:
        keep = state.committed_len + j
        gamma = gamma_of(keep)
        if gamma >= 1:
            out.append(Branch(drafter.fork(state, keep, token), gamma))
    return out


def match_branch(branches: list[Branch], old_len: int, committed_len: int,
                 new_tokens: Sequence[int]) -> tuple[Branch | None, int]:
    """(the branch whose assumed prefix a commit of ``new_tokens`` after ``old_len`` committed
    tokens equals, or None; how many *sent* branches that commit missed). Branches are forked at
    the request's committed length, so their tokens[:old_len] are the request's."""
    new = list(new_tokens)
    hit, misses = None, 0
    for b in branches:
        s = b.state
        if hit is None and s.committed_len == committed_len == old_len + len(new) and \
                s.tokens[old_len:committed_len] == new:
            hit = b
        elif b.sent is not None:
            misses += 1
    return hit, misses
