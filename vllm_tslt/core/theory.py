"""Closed-form acceptance quantities for speculative sampling (used by scripts/theory.py and tests).

For one position with target p and draft distribution q (both [num_tokens, vocab_size]):

    α  = Σ_x min(p(x), q(x)) = 1 - TV(p, q)        acceptance of the untruncated draft
    α̃ = Σ_x min(p(x), q̃(x))                      acceptance of the truncated, quantized draft
    ε  = 1 - q(S)                                  draft mass discarded by truncation

Without quantization q̃ = q·1_S / q(S), and |α̃ - α| <= TV(q, q̃) = ε (TV is 1-Lipschitz).
Quantization moves q̃ by a further TV of at most k / 2**b.

Multi-candidate (m i.i.d. candidates from q̃, recursive rejection): with r_0 = p,
β_i = Σ min(r_i, q̃) and r_{i+1} = norm(max(0, r_i - q̃)), the position is accepted by some
candidate with probability 1 - Π_{i<m} (1 - β_i).
"""

from __future__ import annotations

import torch


def overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_x min(p, q) per row: [num_tokens, vocab_size] x2 -> [num_tokens] (float64)."""
    return torch.minimum(p.double(), q.double()).sum(dim=-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = ½ Σ |p - q| per row -> [num_tokens] float64."""
    return 0.5 * (p.double() - q.double()).abs().sum(dim=-1)


def multi_candidate_acceptance(p: torch.Tensor, q: torch.Tensor, m: int) -> torch.Tensor:
    """Probability that one of m i.i.d. candidates from q is accepted (recursive rejection).

    p, q: [num_tokens, vocab_size] -> [num_tokens, m] float64; column i is the probability that
    some candidate among the first i + 1 is accepted (column 0 is α̃, the spine's acceptance).
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    r = p.double()
    q = q.double()
    all_rejected = torch.ones(p.shape[0], dtype=torch.float64)
    out = []
    for _ in range(m):
        beta = torch.minimum(r, q).sum(dim=-1)  # [num_tokens]
        all_rejected = all_rejected * (1.0 - beta).clamp_min(0.0)
        out.append(1.0 - all_rejected)
        leftover = (r - q).clamp_min(0.0)
        mass = leftover.sum(dim=-1, keepdim=True)
        r = torch.where(mass > 0, leftover / mass.clamp_min(1e-300), r)
    return torch.stack(out, dim=1)
