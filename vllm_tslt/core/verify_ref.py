"""Reference verifiers for TSLT speculative decoding (the spec that kernels are compared against).

Pure torch, one request at a time, random numbers passed in, written for reading rather than speed
(gpt-fast style). Conventions shared with vLLM's rejection sampler:

- accept the draft x at a position iff u * q̃(x) < p(x), u ~ U[0, 1)  (i.e. u < p(x) / q̃(x));
- a "sample from w" (w >= 0, unnormalised) is the exponential race argmax(w / E), E ~ Exp(1) [V]:
  P(argmax = x) = w(x) / sum(w). Exactly one such sample is drawn per call (the recovered token at
  the first rejection, or the bonus token, or the multi-candidate residual), so one noise vector
  ``exp_noise`` [vocab_size] serves every call.

NOTE: all comparisons happen in float32 on q̃ = counts / 2**b, which is exact, so a kernel that
computes the same products in float32 reproduces these outputs bit for bit.
"""

from __future__ import annotations

import torch

from vllm_tslt.core.sparsify import SparseQ


def _race(weights: torch.Tensor, exp_noise: torch.Tensor) -> int:
    """Sample from unnormalised weights [V] (exponential race)."""
    return int(torch.argmax(weights / exp_noise))


def _check(target_probs: torch.Tensor, q: SparseQ, num_draft: int, exp_noise: torch.Tensor) -> None:
    if target_probs.ndim != 2 or target_probs.shape[0] != num_draft + 1:
        raise ValueError(f"target_probs must be [{num_draft + 1}, vocab], got {tuple(target_probs.shape)}")
    if q.num_tokens != num_draft:
        raise ValueError(f"q̃ has {q.num_tokens} rows for {num_draft} draft tokens")
    if exp_noise.shape != (target_probs.shape[1],):
        raise ValueError(f"exp_noise must be [vocab_size], got {tuple(exp_noise.shape)}")


def chain_rejection_sample_ref(
    target_probs: torch.Tensor,  # [num_draft + 1, vocab_size] float32 (draft rows + bonus row)
    draft_tokens: torch.Tensor,  # [num_draft] int
    q: SparseQ,  # num_draft rows: the q̃ each draft token was sampled from
    uniforms: torch.Tensor,  # [num_draft] float in [0, 1)
    exp_noise: torch.Tensor,  # [vocab_size] float32 > 0, Exp(1)
    greedy: bool,
) -> list[int]:
    """Chain speculative sampling with a sparse draft distribution. Returns the emitted tokens.

    For j = 0..γ-1 with x_j ~ q̃_j (Leviathan et al. / Chen et al.):
        accept x_j with probability min(1, p_j(x_j) / q̃_j(x_j));
        on the first rejection emit y ~ norm(max(0, p_j - q̃_j)) and stop;
    if all γ are accepted, emit a bonus y ~ p_γ. The emitted sequence is distributed exactly as
    sampling from p. p_j's mass outside q̃'s support is all in the residual, so truncation costs
    acceptance, never exactness. Greedy: accept iff x_j == argmax p_j, else emit argmax p_j.
    """
    num_draft = draft_tokens.shape[0]
    _check(target_probs, q, num_draft, exp_noise)
    p = target_probs.to(torch.float32)
    q_dense = q.dense(p.shape[1])  # [num_draft, vocab_size] float32, exact
    emitted: list[int] = []
    for j in range(num_draft):
        x = int(draft_tokens[j])
        if greedy:
            best = int(torch.argmax(p[j]))
            emitted.append(best)
            if x != best:
                return emitted
            continue
        if float(uniforms[j]) * q_dense[j, x] < p[j, x]:  # u < p(x) / q̃(x)
            emitted.append(x)
            continue
        residual = torch.clamp(p[j] - q_dense[j], min=0.0)  # [vocab_size]
        if not bool((residual > 0).any()):
            # NOTE: only reachable through float rounding (p == q̃ accepts surely): fall back to p.
            residual = p[j]
        emitted.append(_race(residual, exp_noise))
        return emitted
    bonus = int(torch.argmax(p[num_draft])) if greedy else _race(p[num_draft], exp_noise)
    emitted.append(bonus)
    return emitted


def multi_candidate_rejection_sample_ref(
    target_probs: torch.Tensor,  # [num_draft + 1, vocab_size] float32
    candidates: torch.Tensor,  # [num_draft, m] int; column 0 = spine, 1.. = alternatives, draw order
    q: SparseQ,  # num_draft rows; every candidate of row j was drawn i.i.d. from q̃_j
    uniforms: torch.Tensor,  # [num_draft, m] float in [0, 1)
    exp_noise: torch.Tensor,  # [vocab_size] float32 > 0, Exp(1)
    greedy: bool,
) -> list[int]:
    """Spine + i.i.d. alternatives, recursive rejection per position (SpecInfer). Emitted tokens.

    At position j with candidates c_0..c_{m-1} ~ q̃ i.i.d., residual r <- p_j:
        for i = 0..m-1: accept c_i with probability min(1, r(c_i) / q̃(c_i));
                        on rejection r <- norm(max(0, r - q̃));
        all rejected: emit y ~ r and stop.
    The accepted (or residual) token is distributed as p_j. Accepting the spine c_0 continues to
    position j+1 (the target already scored it); accepting an alternative emits it and stops, since
    the target never saw it (no bonus). All spines accepted: bonus y ~ p_γ.
    Greedy: q̃ is one-hot, so all candidates equal the spine and this is the greedy chain.
    """
    num_draft, m = candidates.shape
    _check(target_probs, q, num_draft, exp_noise)
    if greedy:
        return chain_rejection_sample_ref(target_probs, candidates[:, 0], q, uniforms[:, 0], exp_noise, True)
    p = target_probs.to(torch.float32)
    q_dense = q.dense(p.shape[1])  # [num_draft, vocab_size]
    emitted: list[int] = []
    for j in range(num_draft):
        r = p[j]  # [vocab_size], normalised
        for i in range(m):
            c = int(candidates[j, i])
            if float(uniforms[j, i]) * q_dense[j, c] < r[c]:  # u < r(c) / q̃(c)
                emitted.append(c)
                break
            leftover = torch.clamp(r - q_dense[j], min=0.0)
            mass = leftover.sum()
            # NOTE: mass == 0 means r == q̃ (up to rounding), where rejection cannot happen; keep r.
            r = leftover / mass if float(mass) > 0 else r
        else:
            emitted.append(_race(r, exp_noise))
            return emitted
        if i > 0:  # an alternative was accepted: the target has not scored it, stop here
            return emitted
    emitted.append(_race(p[num_draft], exp_noise))
    return emitted
