"""Losslessness of sparsify-then-sample + the reference verifiers, measured (issue 3 item 4).

Every test draws N = 200 000 seeded trials through the real draft pipeline (``sparsify`` +
``sample_from_sparse``) and a verifier, then asserts with ONE helper that the emitted tokens are
distributed as the target p:

    bound: chi-square goodness of fit (cells with expected count < 5 merged) must have p-value
           > ALPHA = 1e-4, and no token with p = 0 may ever be emitted.

A correct sampler fails this for a given seed with probability 1e-4; the seeds are fixed, so the
outcome is deterministic. Each family has a negative control — a deliberately wrong sampler run
through the same helper — that must be rejected (DESIGN.md exactness rules 1-3).

Speed: the verifiers are vectorised over trials here (``chain_batched`` / ``mc_batched``). Each
test first checks that they emit exactly what the reference functions in
``vllm_tslt.core.verify_ref`` emit on the first ``N_REF`` trials with the same random inputs, so
the statistics are about the references.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from scipy.stats import chi2

from vllm_tslt.core.rng import exponential_noise, position_uniforms
from vllm_tslt.core.sparsify import SparseQ, SparsifyConfig, sample_from_sparse, sparsify
from vllm_tslt.core.verify_ref import (
    chain_rejection_sample_ref,
    multi_candidate_rejection_sample_ref,
)

pytestmark = pytest.mark.statistical

ALPHA = 1e-4
N = 200_000
N_REF = 300
V = 16
GAMMA = 2


# ----------------------------------------------------------------------------------------------
# The one assertion helper
# ----------------------------------------------------------------------------------------------


def assert_distribution_matches(samples: torch.Tensor, expected: torch.Tensor, label: str) -> float:
    """samples [N] int64 in [0, C); expected [C] probabilities. Returns the chi-square p-value."""
    assert samples.ndim == 1 and int(samples.min()) >= 0, f"{label}: missing emissions"
    n = samples.numel()
    expected = expected.double() / expected.double().sum()
    counts = torch.bincount(samples, minlength=expected.numel()).double()
    impossible = int(counts[expected == 0].sum())
    assert impossible == 0, f"{label}: {impossible} samples of tokens with target probability 0"
    exp_counts = expected * n
    big = exp_counts >= 5
    obs, exp = counts[big], exp_counts[big]
    if bool((~big & (expected > 0)).any()):  # merge the rare cells into one
        obs = torch.cat([obs, counts[~big].sum().view(1)])
        exp = torch.cat([exp, exp_counts[~big].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = max(obs.numel() - 1, 1)
    pvalue = float(chi2.sf(stat, dof))
    tv = 0.5 * float((counts / n - expected).abs().sum())
    assert pvalue > ALPHA, f"{label}: chi-square p = {pvalue:.3g} (stat {stat:.1f}, dof {dof}), TV {tv:.4f}"
    return pvalue


def assert_rejected(samples: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    with pytest.raises(AssertionError, match=r"chi-square|probability 0"):
        assert_distribution_matches(samples, expected, label)


# ----------------------------------------------------------------------------------------------
# Trial-batched verifiers (same math, same float32 operations as verify_ref)
# ----------------------------------------------------------------------------------------------


def chain_batched(p, q_dense, drafts, u, noise):
    """p [B, n+1, V], q_dense [B, n, V], drafts [B, n], u [B, n] f32, noise [B, V] -> [B, n+1] (-1: none)."""
    batch, n = drafts.shape
    out = torch.full((batch, n + 1), -1, dtype=torch.long)
    alive = torch.ones(batch, dtype=torch.bool)
    for j in range(n):
        x = drafts[:, j : j + 1]
        accept = (u[:, j : j + 1] * q_dense[:, j].gather(1, x) < p[:, j].gather(1, x)).squeeze(1)
        residual = (p[:, j] - q_dense[:, j]).clamp_min(0.0)
        residual = torch.where((residual > 0).any(1, keepdim=True), residual, p[:, j])
        recovered = torch.argmax(residual / noise, dim=1)
        out[:, j] = torch.where(alive, torch.where(accept, x.squeeze(1), recovered), -1)
        alive = alive & accept
    out[:, n] = torch.where(alive, torch.argmax(p[:, n] / noise, dim=1), -1)
    return out


def mc_batched(p, q_dense, cands, u, noise):
    """cands [B, n, m], u [B, n, m] f32; recursive rejection per position -> [B, n+1] (-1: none)."""
    batch, n, m = cands.shape
    out = torch.full((batch, n + 1), -1, dtype=torch.long)
    reached = torch.ones(batch, dtype=torch.bool)  # every earlier spine was accepted
    for j in range(n):
        r = p[:, j].clone()
        decided = torch.zeros(batch, dtype=torch.bool)
        token = torch.full((batch,), -1, dtype=torch.long)
        accepted_at = torch.full((batch,), m, dtype=torch.long)
        for i in range(m):
            c = cands[:, j, i : i + 1]
            accept = (u[:, j, i : i + 1] * q_dense[:, j].gather(1, c) < r.gather(1, c)).squeeze(1)
            accept = accept & ~decided
            token = torch.where(accept, c.squeeze(1), token)
            accepted_at = torch.where(accept, i, accepted_at)
            decided = decided | accept
            leftover = (r - q_dense[:, j]).clamp_min(0.0)
            mass = leftover.sum(1, keepdim=True)
            r = torch.where(decided.unsqueeze(1) | (mass <= 0), r, leftover / mass)
        token = torch.where(decided, token, torch.argmax(r / noise, dim=1))
        out[:, j] = torch.where(reached, token, -1)
        reached = reached & (accepted_at == 0)
    out[:, n] = torch.where(reached, torch.argmax(p[:, n] / noise, dim=1), -1)
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline: sparsify -> sample candidates from q̃ -> verify
# ----------------------------------------------------------------------------------------------


def repeat_q(q: SparseQ, batch: int) -> SparseQ:
    """The n rows of q repeated for each of `batch` trials: [batch * n, k]."""
    return SparseQ(q.indices.repeat(batch, 1), q.counts.repeat(batch, 1), q.quant_bits)


def draw_candidates(q: SparseQ, batch: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, n, m] i.i.d. draws from each row of q (column 0 = spine), via the real sampler."""
    u = torch.rand(batch * q.num_tokens, m, dtype=torch.float64, generator=gen)
    return sample_from_sparse(repeat_q(q, batch), u).view(batch, q.num_tokens, m)


def verify(p_rows, q_verify: SparseQ, cands, gen, check_ref: bool = True) -> torch.Tensor:
    """Verify [B, n, m] candidates against p_rows [n+1, V] with q_verify; returns [B, n+1]."""
    batch, n, m = cands.shape
    vocab = p_rows.shape[1]
    u = torch.rand(batch, n, m, generator=gen)  # float32 in [0, 1)
    noise = exponential_noise(gen, (batch, vocab))
    p = p_rows.unsqueeze(0).expand(batch, -1, -1)
    qd = q_verify.dense(vocab).unsqueeze(0).expand(batch, -1, -1)
    if m == 1:
        out = chain_batched(p, qd, cands[:, :, 0], u[:, :, 0], noise)
    else:
        out = mc_batched(p, qd, cands, u, noise)
    if check_ref:
        for t in range(N_REF):
            if m == 1:
                ref = chain_rejection_sample_ref(p_rows, cands[t, :, 0], q_verify, u[t, :, 0], noise[t], False)
            else:
                ref = multi_candidate_rejection_sample_ref(p_rows, cands[t], q_verify, u[t], noise[t], False)
            assert ref == [x for x in out[t].tolist() if x >= 0], f"trial {t}: batched != reference"
    return out


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True)


def _make_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, SparsifyConfig]]:
    """name -> (p rows [GAMMA + 1, V], draft logits [GAMMA, V], config). Row 0 is the case."""
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(V, generator=g) * 1.5
    later_p = torch.softmax(torch.randn(GAMMA, V, generator=g), -1)  # rows 1.. (position 1, bonus)
    later_q = torch.randn(GAMMA - 1, V, generator=g)

    def case(p0, q0, cfg):
        return torch.cat([_normalise(p0).view(1, V), later_p]), torch.cat([q0.view(1, V), later_q]), cfg

    p_mode = torch.softmax(base, -1) * 0.5
    p_mode[3] += 0.5
    q_no_mode = torch.tensor([4.0, 3.5, 3.0, -10.0] + [0.0] * (V - 4))
    p_zeros = torch.softmax(base, -1) * (torch.arange(V) >= 4)
    peaky_p = torch.full((V,), 0.1 / (V - 1))
    peaky_p[5] = 0.9
    peaky_q = torch.zeros(V)
    peaky_q[6] = 5.0
    p_top = _normalise(torch.softmax(base.flip(0) * 0.7, -1))
    return {
        "q_misses_p_mode": case(p_mode, q_no_mode, SparsifyConfig(top_k=4)),
        "p_with_zeros": case(p_zeros, torch.arange(V, 0, -1).float() / 3, SparsifyConfig(top_k=6)),
        "peaky": case(peaky_p, peaky_q, SparsifyConfig(top_p=0.95)),
        "flat_p": case(torch.ones(V), base * 2, SparsifyConfig(top_k=8)),
        "top_p": case(p_top, base, SparsifyConfig(top_p=0.7)),
        "top_k_top_p": case(p_top, base, SparsifyConfig(top_k=6, top_p=0.8, quant_bits=8)),
        "quantized_2bit": case(p_top, base, SparsifyConfig(top_k=4, quant_bits=2)),
        "untruncated": case(p_top, base, SparsifyConfig(k_max=V, quant_bits=16)),
    }


CASES = _make_cases()
FULL_Q = SparsifyConfig(k_max=V, quant_bits=16)  # "untruncated" q for the controls


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_first_token_is_target_distributed(name: str, m: int) -> None:
    p_rows, draft_logits, cfg = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + m)
    q = sparsify(draft_logits, cfg)
    out = verify(p_rows, q, draw_candidates(q, N, m, gen), gen)
    assert_distribution_matches(out[:, 0], p_rows[0], f"{name}, m={m}")
    # Non-vacuous: the draft really was truncated/quantized away from the target where claimed.
    if name == "q_misses_p_mode":
        assert int((q.indices == 3).sum()) == 0


# ----------------------------------------------------------------------------------------------
# Negative controls: wrong samplers that the same assertion must reject
# ----------------------------------------------------------------------------------------------


def test_control_verifying_with_untruncated_q_is_rejected() -> None:
    """Rule 1: sample from q̃ (top-k) but verify with the untruncated q (full support, 16 bits)."""
    p_rows, draft_logits, cfg = CASES["q_misses_p_mode"]
    gen = torch.Generator().manual_seed(101)
    q_tilde = sparsify(draft_logits, cfg)
    q_full = sparsify(draft_logits, FULL_Q)
    out = verify(p_rows, q_full, draw_candidates(q_tilde, N, 1, gen), gen)
    assert_rejected(out[:, 0], p_rows[0], "control: verify with untruncated q")


def test_control_truncating_after_sampling_is_rejected() -> None:
    """Rule 2: sample from the full q, then truncate and verify with q̃."""
    p_rows, draft_logits, cfg = CASES["flat_p"]
    gen = torch.Generator().manual_seed(102)
    cands = draw_candidates(sparsify(draft_logits, FULL_Q), N, 1, gen)
    out = verify(p_rows, sparsify(draft_logits, cfg), cands, gen)
    assert_rejected(out[:, 0], p_rows[0], "control: truncate after sampling")


@pytest.mark.parametrize("m", [2, 4])
def test_control_sorted_candidates_is_rejected(m: int) -> None:
    """Rule 3: candidates sorted by q̃ (most probable first) instead of draw order."""
    p_rows, draft_logits, cfg = CASES["top_p"]
    gen = torch.Generator().manual_seed(103 + m)
    q = sparsify(draft_logits, cfg)
    cands = draw_candidates(q, N, m, gen)
    q_of = q.dense(V)[torch.arange(q.num_tokens).view(1, -1, 1), cands]  # [B, n, m]
    order = torch.argsort(q_of, dim=2, descending=True, stable=True)
    out = verify(p_rows, q, cands.gather(2, order), gen)
    assert_rejected(out[:, 0], p_rows[0], f"control: sorted candidates, m={m}")


def test_control_quantization_mismatch_is_rejected() -> None:
    """Rule 1: sample from the unquantized truncated q, verify with its 2-bit quantization."""
    p_rows, draft_logits, cfg = CASES["quantized_2bit"]
    gen = torch.Generator().manual_seed(104)
    fine = SparsifyConfig(top_k=cfg.top_k, quant_bits=16)
    out = verify(p_rows, sparsify(draft_logits, cfg), draw_candidates(sparsify(draft_logits, fine), N, 1, gen), gen)
    assert_rejected(out[:, 0], p_rows[0], "control: quantization mismatch")


# ----------------------------------------------------------------------------------------------
# Two positions with context-dependent p and q: the joint of the first two emitted tokens
# ----------------------------------------------------------------------------------------------

V2 = 8


def _joint_tables():
    g = torch.Generator().manual_seed(2024)
    p0 = torch.softmax(torch.randn(V2, generator=g) * 1.5, -1)  # [V2]
    p1 = torch.softmax(torch.randn(V2, V2, generator=g) * 2.0, -1)  # [V2 context, V2]
    q0 = torch.randn(V2, generator=g) * 1.5 + p0.log()  # draft logits correlated with the target
    q1 = torch.randn(V2, V2, generator=g) + p1.log()
    cfg = SparsifyConfig(top_k=3, quant_bits=8)
    return p0, p1, sparsify(q0.view(1, V2), cfg), sparsify(q1, cfg)


def _rows(q: SparseQ, rows: torch.Tensor) -> SparseQ:
    return SparseQ(q.indices[rows], q.counts[rows], q.quant_bits)


def _verify_rows(p, q_dense, cands, gen):
    """Batched verify with per-trial rows: p [B, n+1, V2], q_dense [B, n, V2], cands [B, n, m]."""
    batch, n, m = cands.shape
    u = torch.rand(batch, n, m, generator=gen)
    noise = exponential_noise(gen, (batch, V2))
    if m == 1:
        return chain_batched(p, q_dense, cands[:, :, 0], u[:, :, 0], noise)
    return mc_batched(p, q_dense, cands, u, noise)


def two_token_joint(m: int, seed: int, continue_past_rejection: bool = False) -> torch.Tensor:
    """First two emitted tokens as t0 * V2 + t1 [N]. A round of γ=2, then (if it emitted only one
    token) a second round of γ=1 in the context of the emitted token."""
    p0, p1, q0, q1 = _joint_tables()
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.full((N, V2), 1.0 / V2)
    c0 = draw_candidates(q0, N, m, gen)[:, 0, :]  # [N, m]
    spine = c0[:, 0]
    q1_ctx = _rows(q1, spine)
    c1 = sample_from_sparse(q1_ctx, torch.rand(N, m, dtype=torch.float64, generator=gen))  # [N, m]
    p = torch.stack([p0.expand(N, V2), p1[spine], uniform], dim=1)
    qd = torch.stack([q0.dense(V2).expand(N, V2), q1_ctx.dense(V2)], dim=1)
    out = _verify_rows(p, qd, torch.stack([c0, c1], dim=1), gen)
    t0, t1 = out[:, 0], out[:, 1].clone()
    need = t1 < 0
    # Round 2 in the committed context t0 (the bug under control: keep verifying in the context of
    # the rejected spine, i.e. do not stop at the first rejection).
    ctx = spine if continue_past_rejection else t0
    q_ctx = _rows(q1, ctx)
    c = c1 if continue_past_rejection else sample_from_sparse(
        q_ctx, torch.rand(N, m, dtype=torch.float64, generator=gen))
    out2 = _verify_rows(torch.stack([p1[ctx], uniform], 1), q_ctx.dense(V2).unsqueeze(1), c.unsqueeze(1), gen)
    t1[need] = out2[need, 0]
    return t0 * V2 + t1


@pytest.mark.parametrize("m", [1, 2])
def test_two_position_joint_is_target_distributed(m: int) -> None:
    p0, p1, _, _ = _joint_tables()
    expected = (p0.view(V2, 1) * p1).flatten()  # P(t0, t1) = p0(t0) p1(t1 | t0)
    assert_distribution_matches(two_token_joint(m, seed=300 + m), expected, f"joint, m={m}")


def test_control_continuing_past_rejection_is_rejected() -> None:
    p0, p1, _, _ = _joint_tables()
    expected = (p0.view(V2, 1) * p1).flatten()
    samples = two_token_joint(1, seed=399, continue_past_rejection=True)
    assert_rejected(samples, expected, "control: continue past a rejection")


# ----------------------------------------------------------------------------------------------
# The draft sampler itself and the per-position uniforms
# ----------------------------------------------------------------------------------------------


def test_sampler_draws_exactly_q_tilde() -> None:
    """Tokens from sample_from_sparse with position_uniforms follow c / 2**b, not the float q."""
    logits = torch.tensor([[2.0, 1.7, 1.0, 0.4, 0.2, -1.0, -3.0, 0.9]])
    cfg = SparsifyConfig(top_k=5, quant_bits=3)
    q = sparsify(logits, cfg)
    u = position_uniforms(seed=7, positions=torch.arange(N), num_streams=1)  # [N, 1]
    tokens = sample_from_sparse(repeat_q(q, N), u)[:, 0]
    assert_distribution_matches(tokens, q.dense(8)[0], "sampler vs q̃")
    # Control: the unquantized truncated q differs from q̃ at 3 bits and must be rejected.
    probs = torch.softmax(logits[0], -1)
    float_q = torch.where(q.dense(8)[0] > 0, probs, 0.0)
    assert_rejected(tokens, float_q, "control: sampler vs unquantized q")


def test_position_uniforms_are_uniform() -> None:
    u = position_uniforms(seed=123, positions=torch.arange(N), num_streams=2)  # [N, 2]
    bins = (u * 64).long()
    uniform = torch.full((64,), 1.0 / 64)
    assert_distribution_matches(bins[:, 0], uniform, "uniforms, stream 0")
    assert_distribution_matches(bins[:, 1], uniform, "uniforms, stream 1")
    assert_distribution_matches(bins[:, 0] * 8 + bins[:, 1] // 8, torch.full((512,), 1 / 512), "streams joint")
    assert_rejected((u[:, 0] ** 1.05 * 64).long(), uniform, "control: skewed uniforms")
