"""Reference verifiers: exact behaviour on hand-made inputs (issue 3 item 3), and theory.py."""

from __future__ import annotations

import pytest
import torch

from vllm_tslt.core.rng import exponential_noise
from vllm_tslt.core.sparsify import SparseQ, SparsifyConfig, sample_from_sparse, sparsify
from vllm_tslt.core.theory import multi_candidate_acceptance, overlap, total_variation
from vllm_tslt.core.verify_ref import (
    chain_rejection_sample_ref,
    multi_candidate_rejection_sample_ref,
)

pytestmark = pytest.mark.unit

V = 6


def one_hot_q(tokens: list[int], bits: int = 4) -> SparseQ:
    n = len(tokens)
    return SparseQ(torch.tensor(tokens, dtype=torch.int32).view(n, 1), torch.full((n, 1), 1 << bits, dtype=torch.int32), bits)


def rows(*dists: list[float]) -> torch.Tensor:
    return torch.tensor(dists, dtype=torch.float32)


NOISE = torch.ones(V)  # argmax(w / 1) = argmax(w): makes "sample from w" deterministic in tests


def test_greedy_chain() -> None:
    p = rows([0, 0.9, 0.1, 0, 0, 0], [0.2, 0, 0, 0.8, 0, 0], [0, 0, 0, 0, 0.6, 0.4])
    q = one_hot_q([1, 3])
    u = torch.zeros(2)
    assert chain_rejection_sample_ref(p, torch.tensor([1, 3]), q, u, NOISE, greedy=True) == [1, 3, 4]
    q = one_hot_q([1, 0])
    assert chain_rejection_sample_ref(p, torch.tensor([1, 0]), q, u, NOISE, greedy=True) == [1, 3]
    q = one_hot_q([2, 3])
    assert chain_rejection_sample_ref(p, torch.tensor([2, 3]), q, u, NOISE, greedy=True) == [1]


def test_acceptance_threshold_is_u_times_q_below_p() -> None:
    """Accept iff u * q̃(x) < p(x): with p(x) = 0.5, q̃(x) = 1 the boundary is u = 0.5."""
    p = rows([0.5, 0.5, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0])
    q = one_hot_q([0])
    draft = torch.tensor([0])
    assert chain_rejection_sample_ref(p, draft, q, torch.tensor([0.4999]), NOISE, False) == [0, 2]
    # Rejected: the residual max(p - q̃, 0) is all on token 1.
    assert chain_rejection_sample_ref(p, draft, q, torch.tensor([0.5]), NOISE, False) == [1]


def test_zero_target_probability_is_never_accepted() -> None:
    p = rows([0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0])
    assert chain_rejection_sample_ref(p, torch.tensor([0]), one_hot_q([0]), torch.zeros(1), NOISE, False) == [1]


def test_all_accepted_when_p_equals_q_and_bonus_from_last_row() -> None:
    q = sparsify(torch.randn(3, V), SparsifyConfig(quant_bits=10))
    p = torch.cat([q.dense(V), rows([0, 0, 0, 0, 0, 1])])
    draft = sample_from_sparse(q, torch.rand(3, dtype=torch.float64))
    out = chain_rejection_sample_ref(p, draft, q, torch.rand(3) * 0.999, NOISE, False)
    assert out == [*draft.tolist(), 5]


def test_recovered_token_comes_from_the_residual() -> None:
    """Mass outside the support is recoverable; tokens where p <= q̃ are not."""
    g = torch.Generator().manual_seed(0)
    p = rows([0.1, 0.2, 0.3, 0.4, 0, 0], [1, 0, 0, 0, 0, 0])
    q = SparseQ(torch.tensor([[2, 3]], dtype=torch.int32), torch.tensor([[12, 4]], dtype=torch.int32), 4)
    seen = set()
    for _ in range(200):
        out = chain_rejection_sample_ref(p, torch.tensor([2]), q, torch.tensor([0.99]), exponential_noise(g, (V,)), False)
        seen.add(out[0])
    # q̃ = (0, 0, 0.75, 0.25): residual max(p - q̃, 0) = (0.1, 0.2, 0, 0.15, 0, 0).
    assert seen == {0, 1, 3}


def test_multi_candidate_with_one_candidate_is_the_chain() -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(100):
        p = torch.softmax(torch.randn(4, V, generator=g) * 2, -1)
        q = sparsify(torch.randn(3, V, generator=g) * 2, SparsifyConfig(top_k=3, quant_bits=6))
        draft = sample_from_sparse(q, torch.rand(3, 1, dtype=torch.float64, generator=g))
        u = torch.rand(3, 1, generator=g)
        noise = exponential_noise(g, (V,))
        for greedy in (False, True):
            chain = chain_rejection_sample_ref(p, draft[:, 0], q, u[:, 0], noise, greedy)
            assert multi_candidate_rejection_sample_ref(p, draft, q, u, noise, greedy) == chain


def test_multi_candidate_alternative_ends_the_round() -> None:
    # Position 0, q̃ = (0, .5, .5, 0): spine 1 has p = 0 and is rejected; the residual becomes
    # norm(max(0, p - q̃)) = (0, 0, .6, .4), under which alternative 2 is accepted (u = 0).
    p = rows([0, 0, 0.8, 0.2, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1])
    q = SparseQ(torch.tensor([[1, 2], [4, -1]], dtype=torch.int32), torch.tensor([[8, 8], [16, 0]], dtype=torch.int32), 4)
    cands = torch.tensor([[1, 2], [4, 4]])
    u = torch.zeros(2, 2)
    assert multi_candidate_rejection_sample_ref(p, cands, q, u, NOISE, False) == [2]
    # Spine accepted at both positions: continue, then the bonus.
    cands = torch.tensor([[2, 1], [4, 4]])
    assert multi_candidate_rejection_sample_ref(p, cands, q, u, NOISE, False) == [2, 4, 5]
    # All rejected: r = (0, 0, .6, .4), then norm(max(0, r - q̃)) = (0, 0, .2, .8); argmax = 3.
    cands = torch.tensor([[1, 1], [4, 4]])
    assert multi_candidate_rejection_sample_ref(p, cands, q, torch.full((2, 2), 0.999), NOISE, False) == [3]


def test_shape_checks() -> None:
    p = torch.softmax(torch.randn(3, V), -1)
    q = one_hot_q([0, 1])
    with pytest.raises(ValueError, match="target_probs"):
        chain_rejection_sample_ref(p[:2], torch.tensor([0, 1]), q, torch.zeros(2), NOISE, False)
    with pytest.raises(ValueError, match="exp_noise"):
        chain_rejection_sample_ref(p, torch.tensor([0, 1]), q, torch.zeros(2), torch.ones(V + 1), False)
    with pytest.raises(ValueError, match="rows"):
        chain_rejection_sample_ref(p, torch.tensor([0, 1]), one_hot_q([0]), torch.zeros(2), NOISE, False)


def test_theory_closed_forms() -> None:
    p = rows([0.5, 0.5, 0, 0, 0, 0])
    q = rows([0.25, 0.25, 0.5, 0, 0, 0])
    assert overlap(p, q).item() == pytest.approx(0.5)
    assert total_variation(p, q).item() == pytest.approx(0.5)
    acc = multi_candidate_acceptance(p, q, 3)[0]
    # β0 = 0.5, r1 = (0.5, 0.5) again (p - q = (0.25, 0.25)), so each try accepts w.p. 0.5.
    assert acc.tolist() == pytest.approx([0.5, 0.75, 0.875])


def test_theory_matches_the_reference_verifier() -> None:
    """The spine's acceptance in the reference equals α̃ = Σ min(p, q̃) within 5 sigma."""
    g = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(2, V, generator=g) * 2, -1)
    q = sparsify(torch.randn(1, V, generator=g) * 2 + p[0].log().view(1, V), SparsifyConfig(top_k=3, quant_bits=8))
    m, trials = 3, 3000
    cands = sample_from_sparse(SparseQ(q.indices.repeat(trials, 1), q.counts.repeat(trials, 1), 8),
                               torch.rand(trials, m, dtype=torch.float64, generator=g))
    spine = 0
    for t in range(trials):
        noise = exponential_noise(g, (V,))
        out = multi_candidate_rejection_sample_ref(p, cands[t : t + 1], q, torch.rand(1, m, generator=g), noise, False)
        spine += len(out) == 2  # spine accepted -> the bonus follows
    expected = float(multi_candidate_acceptance(p[:1], q.dense(V), m)[0, 0])
    assert expected == pytest.approx(float(overlap(p[:1], q.dense(V))[0]))
    sigma = (expected * (1 - expected) / trials) ** 0.5
    assert abs(spine / trials - expected) < 5 * sigma, (spine / trials, expected)
