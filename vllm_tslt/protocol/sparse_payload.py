"""The packed bitstream of a draft's sparse q̃ rows + token columns (layout: codec.py module doc)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vllm_tslt.core.sparsify import MAX_QUANT_BITS, PAD_ID, SparseQ
from vllm_tslt.protocol.bitpack import BitReader, BitWriter
from vllm_tslt.protocol.errors import ProtocolError, Reason, get_bin, get_int

RICE_BITS = 5  # width of the per-row Rice parameter field
MAX_RICE = 31


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Elementwise int.bit_length for non-negative int64 (< 2**52)."""
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    nz = x > 0
    out[nz] = np.floor(np.log2(x[nz].astype(np.float64))).astype(np.int64) + 1
    return out


def _columns_of(indices: np.ndarray, tokens: np.ndarray, what: str) -> np.ndarray:
    """Column of each token in its row's support: indices [γ, k], tokens [γ, c] -> [γ, c]."""
    hit = indices[:, None, :] == tokens[:, :, None]  # [γ, c, k]
    if not hit.any(axis=2).all():
        raise ValueError(f"a {what} is not in its row's support")
    return hit.argmax(axis=2)


def _check_sparse_q(q: SparseQ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = q.indices.numpy().astype(np.int64)  # [γ, k]
    cnt = q.counts.numpy().astype(np.int64)
    valid = idx != PAD_ID
    k = valid.sum(axis=1)
    if idx.ndim != 2 or cnt.shape != idx.shape or not 1 <= q.quant_bits <= MAX_QUANT_BITS:
        raise ValueError("SparseQ must have matching [γ, k] indices/counts and quant_bits in 1..16")
    if (k < 1).any() or (valid != (np.arange(idx.shape[1]) < k[:, None])).any():
        raise ValueError("SparseQ rows need >= 1 index and padding only at the end")
    if (np.diff(idx, axis=1)[valid[:, 1:]] <= 0).any() or (idx[valid] < 0).any():
        raise ValueError("SparseQ indices must be strictly ascending and non-negative")
    if (np.where(valid, cnt < 1, cnt != 0)).any() or (cnt.sum(axis=1) != q.total).any():
        raise ValueError("SparseQ counts must be >= 1, 0 at padding, and sum to 2**quant_bits")
    return idx, cnt, k


def encode_sparse_rows(
    q: SparseQ, tokens: torch.Tensor, alternatives: torch.Tensor | None
) -> tuple[bytes, list[int]]:
    """Pack q̃ rows, spine tokens [γ] and alternatives [γ, m - 1]. Returns (payload, header).

    header = [γ, m, quant_bits, kw]; raises ValueError on an inconsistent draft.
    """
    idx, cnt, k = _check_sparse_q(q)
    gamma = idx.shape[0]
    spine = tokens.numpy().astype(np.int64).reshape(gamma, 1)
    alts = np.zeros((gamma, 0), np.int64) if alternatives is None else alternatives.numpy().astype(np.int64)
    if alts.ndim != 2 or alts.shape[0] != gamma:
        raise ValueError(f"alternatives must be [{gamma}, m - 1], got {alts.shape}")
    cols = _columns_of(idx, np.concatenate([spine, alts], axis=1), "draft token or alternative")

    valid = idx != PAD_ID
    prev = np.concatenate([np.full((gamma, 1), -1), idx[:, :-1]], axis=1)
    gaps = np.where(valid, idx - prev - 1, 0)  # [γ, k] >= 0
    # Optimal Rice parameter per row: bits(r) = Σ (gap >> r) + k (r + 1).
    r_grid = np.arange(MAX_RICE + 1)
    cost = (gaps[:, :, None] >> r_grid).sum(axis=1) + k[:, None] * (r_grid + 1)  # [γ, 32]
    rice = cost.argmin(axis=1)  # [γ]
    rice_e = np.repeat(rice, k)  # per valid entry, row-major
    gaps_e = gaps[valid]
    is_last = (np.arange(idx.shape[1]) == (k - 1)[:, None])[valid]
    kw = int(_bit_length(np.array([k.max() - 1]))[0])
    tw = _bit_length(k - 1)  # token-column width per row

    w = BitWriter()
    w.fixed(k - 1, kw)
    w.fixed(rice, RICE_BITS)
    w.fixed(gaps_e & ((1 << rice_e) - 1), rice_e)
    w.fixed(cnt[valid][~is_last], q.quant_bits)
    w.fixed(cols[:, 0], tw)
    w.fixed(cols[:, 1:].ravel(), np.repeat(tw, alts.shape[1]))
    w.unary(gaps_e >> rice_e)
    return w.to_bytes(), [gamma, 1 + alts.shape[1], q.quant_bits, kw]


def decode_sparse_rows(
    fields: list[Any], limits: Any
) -> tuple[SparseQ, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``encode_sparse_rows`` from frame fields [γ, m, b, kw, payload], fully validated."""
    gamma = get_int(fields[0], "gamma", 1, limits.max_gamma)
    m = get_int(fields[1], "num_candidates", 1, limits.max_candidates)
    b = get_int(fields[2], "quant_bits", 1, MAX_QUANT_BITS)
    kw = get_int(fields[3], "kw", 0, 32)
    rd = BitReader(get_bin(fields[4], "payload"))

    k = rd.fixed(kw, gamma).astype(np.int64) + 1  # [γ]
    if k.max() > min(limits.max_k, limits.vocab_size):
        raise ProtocolError(Reason.TOO_LARGE, f"support size {int(k.max())} > max_k / vocab_size")
    if k.max() > (1 << b):
        raise ProtocolError(Reason.BAD_COUNTS, f"support size {int(k.max())} > 2**quant_bits")
    rice = rd.fixed(RICE_BITS, gamma).astype(np.int64)
    n_entries = int(k.sum())
    rice_e = np.repeat(rice, k)
    low = rd.fixed(rice_e).astype(np.int64)
    counts_rest = rd.fixed(b, n_entries - gamma).astype(np.int64)
    tw = _bit_length(k - 1)
    cols = rd.fixed(np.concatenate([tw, np.repeat(tw, m - 1)])).astype(np.int64)
    high = rd.unary(n_entries)
    rd.finish()

    row = np.repeat(np.arange(gamma), k)  # [N]
    starts = np.cumsum(k) - k
    col = np.arange(n_entries) - starts[row]
    if (high > (limits.vocab_size >> rice_e)).any():  # also keeps high << rice from overflowing
        raise ProtocolError(Reason.BAD_INDICES, "gap beyond the vocabulary")
    steps = (high << rice_e) + low + 1  # index - previous index (first: index + 1)
    csum = np.cumsum(steps)
    indices_e = csum - (csum[starts] - steps[starts])[row] - 1
    if indices_e.max() >= limits.vocab_size:
        raise ProtocolError(Reason.BAD_INDICES, f"index {int(indices_e.max())} >= vocab_size")

    is_last = col == k[row] - 1
    counts_e = np.zeros(n_entries, dtype=np.int64)
    counts_e[~is_last] = counts_rest
    rest_sum = np.bincount(row[~is_last], weights=counts_rest, minlength=gamma).astype(np.int64)
    counts_e[is_last] = (1 << b) - rest_sum
    if (counts_e < 1).any():
        raise ProtocolError(Reason.BAD_COUNTS, "a count < 1 (or counts exceeding 2**quant_bits)")
    token_cols = np.concatenate([cols[:gamma, None], cols[gamma:].reshape(gamma, m - 1)], axis=1)  # [γ, m]
    if (token_cols >= k[:, None]).any():
        raise ProtocolError(Reason.NOT_IN_SUPPORT, "a draft token's column is outside its support")

    width = int(k.max())
    indices = np.full((gamma, width), PAD_ID, dtype=np.int32)
    counts = np.zeros((gamma, width), dtype=np.int32)
    indices[row, col] = indices_e
    counts[row, col] = counts_e
    cands = np.take_along_axis(indices, token_cols, axis=1).astype(np.int64)  # [γ, m]
    q = SparseQ(torch.from_numpy(indices), torch.from_numpy(counts), b)
    alts = torch.from_numpy(cands[:, 1:].copy()) if m > 1 else None
    return q, torch.from_numpy(cands[:, 0].copy()), alts
