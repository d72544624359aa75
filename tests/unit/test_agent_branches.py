"""Send-ahead branches: the selection rule (vllm_tslt/agent/branches.py) and Drafter.fork."""

from __future__ import annotations

import pytest
import torch

from vllm_tslt.agent.branches import MAX_BRANCH_BUDGET, guess_tokens, level_quotas, plan_branches
from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.drafter import Drafter
from vllm_tslt.core.sparsify import SparsifyConfig
from vllm_tslt.protocol import prefix_hash

pytestmark = pytest.mark.unit
TOL = 1e-5


def _row(pairs: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    idx = sorted(pairs)
    return torch.tensor(idx, dtype=torch.int32), torch.tensor([pairs[i] for i in idx])


@pytest.mark.parametrize("budget", range(MAX_BRANCH_BUDGET + 1))
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 0.95, 1.0])
def test_level_quotas_spend_the_budget(alpha: float, budget: int) -> None:
    q = level_quotas(alpha, 4, budget)
    assert len(q) == 5 and sum(q) == budget and min(q) >= 0


def test_level_quotas_follow_the_outcome_probabilities() -> None:
    assert level_quotas(0.2, 3, 1) == [1, 0, 0, 0]  # low acceptance: rejection at 0 is likeliest
    assert level_quotas(0.95, 3, 1) == [0, 0, 0, 1]  # high: all accepted (another bonus guess)
    assert level_quotas(0.5, 2, 0) == [0, 0, 0]
    assert level_quotas(0.5, 2, 3) == [2, 1, 0]  # w = .5, .25, .25 (the bonus's 1st guess: /2)


def test_guess_tokens_by_mass_without_the_drafted_token() -> None:
    idx, counts = _row({3: 10, 5: 40, 7: 40, 9: 0, 11: 14})
    assert guess_tokens(idx, counts, exclude=5, quota=2) == [7, 11]
    assert guess_tokens(idx, counts, exclude=3, quota=9) == [5, 7, 11]  # never a zero mass
    assert guess_tokens(idx, counts, exclude=3, quota=0) == []


def test_plan_is_causal_per_level() -> None:
    """Level j's branches depend on rows[:j + 1] and chain[:j + 1] only: changing later rows or tokens
    (drawn with the uniforms the level-j branch draws with) leaves level j's plan unchanged."""
    rows = [_row({1: 50, 2: 30, 3: 20}), _row({4: 60, 5: 40}), _row({6: 90, 7: 5, 8: 5})]
    plan = plan_branches(rows, [1, 4, 6], gamma=2, alpha=0.5, budget=4)
    # quotas [3, 1, 0]: row 0 has two guesses, its unused one passes to level 1 (row 1 has one
    # guess besides chain[1]) and on to level 2.
    assert plan == [(0, 2), (0, 3), (1, 5), (2, 7)]
    other = plan_branches([*rows[:1], _row({4: 1, 5: 99}), _row({7: 100})], [1, 5, 7], 2, 0.5, 4)
    assert [b for b in other if b[0] == 0] == [(0, 2), (0, 3)]
    assert [b for b in other if b[0] == 1] == [(1, 4)]


def test_branch_budget_option_is_validated() -> None:
    assert AgentConfig(draft_model="m", branch_budget="3").branch_budget == 3
    assert AgentConfig(draft_model="m").branch_budget == "auto"
    for bad in (-1, MAX_BRANCH_BUDGET + 1, "many", 1.5, True):
        with pytest.raises(ValueError, match="branch_budget"):
            AgentConfig(draft_model="m", branch_budget=bad)


@pytest.fixture(scope="module")
def drafter(tiny_pair):
    return Drafter(str(tiny_pair.draft), device="cpu", base=SparsifyConfig(top_k=16))


def test_fork_drafts_like_a_fresh_state_and_leaves_the_parent_alone(drafter) -> None:
    prompt = drafter.tokenizer("def main(argv):\n    parser = ")["input_ids"]
    parent = drafter.new_state("r", prompt, {"temperature": 1.0, "seed": 3})
    for _ in range(5):
        drafter.extend([parent])
    before = (list(parent.tokens), parent.cache_len, drafter.peek_logits(parent))
    keep = len(prompt) + 2
    token = (parent.tokens[keep] + 1) % drafter.vocab_size
    branch = drafter.fork(parent, keep, token)
    assert branch.tokens == [*parent.tokens[:keep], token]
    assert branch.committed_len == keep + 1 and branch.chain_len == 0
    assert branch.hasher.value() == prefix_hash(branch.tokens)
    assert branch.cache_len == keep
    for _ in range(3):  # batched with the parent, as the runtime does
        drafter.extend([parent, branch])
    fresh = drafter.new_state("f", branch.tokens[:keep + 1], {"temperature": 1.0, "seed": 3})
    for _ in range(3):
        drafter.extend([fresh])
    assert fresh.chain_tokens() == branch.chain_tokens()  # same seed, positions and prefix
    assert (drafter.peek_logits(branch) - drafter.recompute_logits(branch.tokens)).abs().max() < TOL
    assert parent.tokens[:len(before[0])] == before[0]
    assert (drafter.recompute_logits(parent.tokens) - drafter.peek_logits(parent)).abs().max() < TOL
    msg = drafter.draft_message(branch, 3)
    assert msg.committed_len == keep + 1 and msg.prefix_hash == prefix_hash(branch.tokens[:keep + 1])


def test_auto_budget_fits_the_uplink_and_branch_gamma_fits_the_verification() -> None:
    from vllm_tslt.agent.adaptive import AdaptiveConfig, GammaController

    ctl = GammaController(AdaptiveConfig(gamma_max=4))
    assert ctl.branch_budget(3, cap=2) == 2  # rate unknown: the cap
    assert ctl.branch_gamma(3) == 3  # times unknown: γ
    rate = 2_000.0  # bytes/s: a link so slow that a branch (~60 B) takes 30 ms
    for i in range(40):
        payload = 40 + 10 * (i % 5)
        ctl.observe_round(3, 2, payload, 0.01 + payload / rate)
    assert ctl.link.rate_bytes_per_s == pytest.approx(rate, rel=0.05)
    fit = ctl.branch_budget(3, cap=8)
    per_branch = 3 * ctl.bytes_per_token.value
    assert fit == int(0.5 * rate * ctl.round_time(3) / per_branch) and fit < 8
    assert ctl.branch_budget(0, cap=8) == 0
    ctl.observe_edge_status(0.020, 0.0)  # the edge's step: 20 ms
    for _ in range(20):
        ctl.observe_draft(1, 0.008)  # one (batched) extension: 8 ms
    assert ctl.branch_gamma(4) == 2 and ctl.branch_gamma(1) == 1
