"""Sparsify-then-sample: truncate the draft distribution, quantize it to integer masses, sample from it.

The draft distribution q (softmax of the draft logits at a temperature) is truncated to a small
support S (top-k and/or top-p, capped at ``k_max``), renormalised and quantized to integer counts
c(x) >= 1 with sum(c) == 2**b. The transmitted distribution is q̃(x) = c(x) / 2**b, which is exact in
fp32, so device and edge compute it bit-identically (DESIGN.md exactness rule 1). The draft token is
sampled from that very q̃ (rule 2: sample after truncating, never before).

Layout of a sparse q̃ for ``num_tokens`` draft rows (``SparseQ``):

    indices: [num_tokens, k] int32, sorted ascending per row, padded at the end with PAD_ID (-1)
    counts:  [num_tokens, k] int32, >= 1 at listed indices, 0 at padding, sum per row == 2**quant_bits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_ID = -1  # index padding in SparseQ.indices
MAX_QUANT_BITS = 16  # counts fit in uint16 on the wire (a single token carries 2**16 only alone)


@dataclass(frozen=True)
class SparsifyConfig:
    """Draft-side truncation settings. ``temperature == 0`` means greedy (q̃ one-hot at the argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    k_max: int = 64
    quant_bits: int = 12

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or not (t >= 0.0 and t < float("inf")):
            raise ValueError(f"SparsifyConfig.temperature must be a finite float >= 0, got {t!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"SparsifyConfig.top_k must be None or an int >= 1, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (not isinstance(p, (int, float)) or not (0.0 < p <= 1.0)):
            raise ValueError(f"SparsifyConfig.top_p must be None or in (0, 1], got {p!r}")
        if not _is_int(self.k_max) or self.k_max < 1:
            raise ValueError(f"SparsifyConfig.k_max must be an int >= 1, got {self.k_max!r}")
        b = self.quant_bits
        if not _is_int(b) or not (1 <= b <= MAX_QUANT_BITS):
            raise ValueError(f"SparsifyConfig.quant_bits must be an int in 1..16, got {b!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def support_cap(self) -> int:
        """Largest support a row can have: every kept token needs a count >= 1 out of 2**b."""
        cap = min(self.k_max, 1 << self.quant_bits)
        return cap if self.top_k is None else min(cap, self.top_k)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SparseQ:
    """Integer-mass sparse draft distribution q̃(x) = counts / 2**quant_bits (see module doc)."""

    indices: torch.Tensor  # [num_tokens, k] int32, ascending, PAD_ID-padded at the end
    counts: torch.Tensor  # [num_tokens, k] int32, 0 at padding, row sum == 2**quant_bits
    quant_bits: int

    @property
    def total(self) -> int:
        return 1 << self.quant_bits

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    def support_sizes(self) -> torch.Tensor:
        """[num_tokens] int64: number of listed (non-padding) indices per row."""
        return (self.indices != PAD_ID).sum(dim=1)

    def probs(self) -> torch.Tensor:
        """[num_tokens, k] float32 q̃ at the listed indices (0 at padding). Exact: c / 2**b."""
        return self.counts.to(torch.float32) / float(self.total)

    def dense(self, vocab_size: int) -> torch.Tensor:
        """[num_tokens, vocab_size] float32 q̃ scattered into the full vocabulary."""
        return scatter_rows(self.indices, self.probs(), vocab_size)

    def prob_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """q̃ of given tokens per row: tokens [num_tokens, m] int -> [num_tokens, m] float32."""
        return values_at(self.indices, self.probs(), tokens)

    @staticmethod
    def from_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], quant_bits: int) -> SparseQ:
        """Stack per-position (indices [k_j], counts [k_j]) rows, padded to the widest."""
        indices, counts = stack_rows(rows, torch.int32)
        return SparseQ(indices, counts, quant_bits)

    def rows(self, start: int, stop: int) -> SparseQ:
        return SparseQ(self.indices[start:stop], self.counts[start:stop], self.quant_bits)

    @staticmethod
    def one_hot(tokens: torch.Tensor, quant_bits: int = 1) -> SparseQ:
        """q̃ = δ(token) per row: tokens [n] -> SparseQ with k = 1 (the lossless fallback)."""
        n = tokens.shape[0]
        return SparseQ(tokens.to(torch.int32).view(n, 1),
                       torch.full((n, 1), 1 << quant_bits, dtype=torch.int32), quant_bits)

    @staticmethod
    def concat(parts: list[SparseQ]) -> SparseQ:
        """Stack rows; k is padded to the widest part, masses rescaled to the finest quant_bits.

        NOTE: c / 2**b == (c << (B - b)) / 2**B exactly, so rescaling changes no probability.
        """
        if not parts:
            return SparseQ(torch.empty(0, 1, dtype=torch.int32),
                           torch.empty(0, 1, dtype=torch.int32), 1)
        bits = max(p.quant_bits for p in parts)
        k = max(p.indices.shape[1] for p in parts)
        indices, counts = [], []
        for p in parts:
            pad = k - p.indices.shape[1]
            indices.append(torch.nn.functional.pad(p.indices, (0, pad), value=PAD_ID))
            counts.append(torch.nn.functional.pad(p.counts << (bits - p.quant_bits), (0, pad)))
        return SparseQ(torch.cat(indices), torch.cat(counts), bits)


def scatter_rows(indices: torch.Tensor, values: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, k] values at PAD_ID-padded indices -> [n, vocab_size] float32 (0 elsewhere)."""
    out = torch.zeros(indices.shape[0], vocab_size + 1, dtype=torch.float32)
    # NOTE: padding (-1) is routed to the extra column vocab_size and dropped.
    cols = torch.where(indices == PAD_ID, vocab_size, indices).long()
    out.scatter_(1, cols, values.to(torch.float32))
    return out[:, :vocab_size].contiguous()


def values_at(indices: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row, the value at each given token (0 if not listed): tokens [n, m] -> [n, m]."""
    hit = indices.unsqueeze(1) == tokens.to(torch.int32).unsqueeze(2)  # [n, m, k]
    return (hit * values.unsqueeze(1)).sum(dim=2)


def stack_rows(rows: list[tuple[torch.Tensor, torch.Tensor]],
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (indices [k_j], values [k_j]) -> ([n, k] int32 PAD_ID-padded, [n, k] dtype)."""
    width = max(int(idx.numel()) for idx, _ in rows)
    indices = torch.full((len(rows), width), PAD_ID, dtype=torch.int32)
    values = torch.zeros((len(rows), width), dtype=dtype)
    for j, (idx, val) in enumerate(rows):
        indices[j, : idx.numel()] = idx
        values[j, : val.numel()] = val
    return indices, values


# ----------------------------------------------------------------------------------------------
# Truncation and quantization
# ----------------------------------------------------------------------------------------------


def sparsify_with_mass(logits: torch.Tensor, cfg: SparsifyConfig) -> tuple[SparseQ, torch.Tensor]:
    """Truncate + quantize draft logits. Returns (q̃, kept mass q(S) [num_tokens] float32).

    Order of operations (vLLM's): temperature -> top-k (renormalised) -> top-p -> cap at k_max and
    at 2**quant_bits. The discarded mass reported is 1 - q(S) under the tempered softmax q.
    """
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [num_tokens, vocab_size] tensor, got {logits.shape}")
    n, vocab_size = logits.shape
    logits = logits.detach().to("cpu", torch.float32)
    if cfg.greedy:
        top = logits.argmax(dim=1, keepdim=True).to(torch.int32)  # [n, 1]
        counts = torch.full((n, 1), 1 << cfg.quant_bits, dtype=torch.int32)
        # NOTE: at temperature 0 q itself is the point mass at the argmax: nothing is discarded.
        return SparseQ(top, counts, cfg.quant_bits), torch.ones(n, dtype=torch.float32)

    probs = torch.softmax(logits / cfg.temperature, dim=1)  # [n, vocab_size] float32
    k_cap = min(cfg.support_cap, vocab_size)
    top_probs, top_ids = torch.topk(probs, k_cap, dim=1)  # [n, k_cap], descending
    keep = torch.ones_like(top_probs, dtype=torch.bool)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        # Nucleus over the top-k-renormalised distribution (full distribution when top_k is None):
        # keep a token iff the mass strictly before it is < top_p; the first token is always kept.
        denom = top_probs.sum(1, keepdim=True) if cfg.top_k is not None else 1.0
        mass_before = (torch.cumsum(top_probs, dim=1) - top_probs) / denom
        keep = mass_before < cfg.top_p
        keep[:, 0] = True
    kept_probs = torch.where(keep, top_probs, 0.0)
    kept_mass = kept_probs.sum(dim=1)
    counts_desc = quantize_masses(kept_probs.double(), keep, cfg.quant_bits)  # [n, k_cap]
    return _to_index_order(top_ids, counts_desc, keep, cfg.quant_bits), kept_mass


def sparsify(logits: torch.Tensor, cfg: SparsifyConfig) -> SparseQ:
    """Truncated, quantized q̃ for each row of ``logits`` [num_tokens, vocab_size]."""
    return sparsify_with_mass(logits, cfg)[0]


def quantize_masses(masses: torch.Tensor, keep: torch.Tensor, quant_bits: int) -> torch.Tensor:
    """Round non-negative masses [n, k] (renormalised over ``keep``) to int32 counts.

    Every kept entry gets a count >= 1, the rest 0, and each row sums to exactly T = 2**quant_bits.
    Deterministic largest-remainder rounding: c = max(1, floor(T m)); give the leftover units to the
    largest remainders T m - c; if forcing the 1s overshot T, take units back from the most
    over-allocated entries that still have c >= 2. Requires keep.sum(1) <= T (support_cap).
    """
    total = 1 << quant_bits
    m = masses * keep
    m = m / m.sum(dim=1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    target = m * total  # [n, k] float64
    counts = torch.where(keep, target.floor().clamp_min(1.0), 0.0)
    remainder = torch.where(keep, target - counts, -float("inf"))
    short = total - counts.sum(dim=1)  # [n], in [-k, k]
    # NOTE: the stable argsort makes ties go to the lower column (the more probable token).
    order = torch.argsort(remainder, dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)  # rank of each column by remainder
    counts = counts + (rank < short.clamp_min(0).unsqueeze(1)).to(counts.dtype)
    while True:  # overshoot: at most a few rounds, each vectorised over rows
        excess = counts.sum(dim=1) - total  # [n]
        if not bool((excess > 0).any()):
            break
        score = torch.where(counts >= 2, remainder, float("inf"))  # most negative first
        order = torch.argsort(score, dim=1, stable=True)
        rank = torch.argsort(order, dim=1)
        take = (rank < excess.clamp_min(0).unsqueeze(1)) & (counts >= 2)
        counts = counts - take.to(counts.dtype)
        remainder = remainder + take.to(remainder.dtype)
    return counts.to(torch.int32)


def _to_index_order(
    ids: torch.Tensor, counts: torch.Tensor, keep: torch.Tensor, quant_bits: int
) -> SparseQ:
    """Reorder kept (id, count) pairs by ascending id, padding at the end, trimmed to max support."""
    big = torch.iinfo(torch.int64).max
    key = torch.where(keep, ids.long(), big)  # [n, k_cap]
    key_sorted, order = torch.sort(key, dim=1)
    width = max(int(keep.sum(dim=1).max()), 1)
    key_sorted, order = key_sorted[:, :width], order[:, :width]
    indices = torch.where(key_sorted == big, PAD_ID, key_sorted).to(torch.int32)
    counts = counts.gather(1, order).to(torch.int32)
    return SparseQ(indices.contiguous(), counts.contiguous(), quant_bits)


# ----------------------------------------------------------------------------------------------
# Sampling from q̃
# ----------------------------------------------------------------------------------------------


def sample_from_sparse(q: SparseQ, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample from q̃ with integer thresholds.

    uniforms [num_tokens] or [num_tokens, m] in [0, 1) -> token ids, same shape, int64.
    Token = first listed x whose cumulative count exceeds floor(u * 2**b). With u uniform on a grid
    of 2**-24 or finer this draws x with probability exactly c(x) / 2**b.
    """
    squeeze = uniforms.ndim == 1
    u = uniforms.unsqueeze(1) if squeeze else uniforms  # [n, m]
    if u.shape[0] != q.num_tokens:
        raise ValueError(f"uniforms has {u.shape[0]} rows, q̃ has {q.num_tokens}")
    thresholds = (u.double() * q.total).floor().long().clamp(0, q.total - 1)  # [n, m]
    cum = torch.cumsum(q.counts.long(), dim=1)  # [n, k]; padding repeats T > any threshold
    cols = torch.searchsorted(cum, thresholds, right=True)  # first column with cum > threshold
    tokens = q.indices.long().gather(1, cols)
    return tokens.squeeze(1) if squeeze else tokens


def sparsify_then_sample(
    logits: torch.Tensor,
    cfg: SparsifyConfig,
    uniforms: torch.Tensor | torch.Generator,
) -> tuple[torch.Tensor, SparseQ]:
    """Truncate + quantize the draft distribution, then sample from exactly that q̃.

    logits: [num_tokens, vocab_size] float. uniforms: [num_tokens] (one draft token per row) or
    [num_tokens, m] (multi-candidate: column 0 is the spine, 1.. are i.i.d. alternatives in draw
    order), values in [0, 1); or a torch.Generator to draw [num_tokens] uniforms from.
    Returns (tokens int64 with the uniforms' shape, SparseQ). Greedy: the argmax, q̃ one-hot.
    """
    q = sparsify(logits, cfg)
    if isinstance(uniforms, torch.Generator):
        uniforms = torch.rand(q.num_tokens, dtype=torch.float64, generator=uniforms)
    return sample_from_sparse(q, uniforms), q
