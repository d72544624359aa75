"""The entropy-coded payload of a draft's sparse q̃ rows + token columns (protocol v2).

Frame fields ``[γ, m, quant_bits, kw, ga, ca, payload]``: kw = bit_length(max k - 1); ga and ca the
alphabet sizes of the gap and count buckets (largest bucket + 1; the tables are cut to them, which
makes the categorical decode cheaper). The payload is one ANS stream (vllm_tslt.protocol.entropy),
sections in decode order; rows j = 0..γ-1, entries in ascending index order, N = Σ k_j:

    k_j - 1       Uniform(2**kw) per row (absent when kw = 0)     support size per row
    t_j * NC + u_j   Uniform(NG * NC) per row                     the row's gap table t_j and
                                                                  count table u_j (the encoder's
                                                                  cheapest; entropy.py)
    gap buckets   Categorical gap table t_j, N symbols             bit_length(gap), gap = index -
                                                                   previous index - 1 (first: index)
    count buckets Categorical count table u_j, N - γ symbols       bit_length(count) - 1, all but
                                                                   each row's last count (implied:
                                                                   2**b - sum of the others)
    mantissas     Uniform, gaps then counts (entropy.py)           the bits below each leading one
    columns       Categorical counts_j / 2**b, [γ', m] row-major   column of the draft token, then
                  over the rows with k_j >= 2                      of each alternative (draw order)

The column of a token is coded with q̃ itself: a token sampled from q̃ costs -log2 q̃(x) bits, the
cheapest code there is for it. Ascending order and "every candidate in the support" are structural;
``decode_sparse_rows`` still checks sizes, index range, counts, columns and that nothing is left.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vllm_tslt.core.sparsify import MAX_QUANT_BITS, PAD_ID, SparseQ
from vllm_tslt.protocol.entropy import (
    COUNT_BUCKETS,
    COUNT_TABLES,
    GAP_BUCKETS,
    GAP_TABLES,
    NUM_COUNT_TABLES,
    NUM_TABLE_PAIRS,
    Decoder,
    Encoder,
    bit_length,
    join_mantissas,
    split_mantissas,
)
from vllm_tslt.protocol.errors import ProtocolError, Reason, get_bin, get_int


def _columns_of(indices: np.ndarray, tokens: np.ndarray, what: str) -> np.ndarray:
    """Column of each token in its row's support: indices [γ, k], tokens [γ, c] -> [γ, c]."""
    hit = indices[:, None, :] == tokens[:, :, None]  # [γ, c, k]
    if not hit.any(axis=2).all():
        raise ValueError(f"a {what} is not in its row's support")
    return hit.argmax(axis=2)


def _check_sparse_q(q: SparseQ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (indices [γ, k], counts [γ, k], valid [γ, k], k [γ]); ValueError if inconsistent."""
    idx = q.indices.numpy().astype(np.int64)  # [γ, k]
    cnt = q.counts.numpy().astype(np.int64)
    if idx.ndim != 2 or cnt.shape != idx.shape or not 1 <= q.quant_bits <= MAX_QUANT_BITS:
        raise ValueError("SparseQ must have matching [γ, k] indices/counts and quant_bits in 1..16")
    valid = idx != PAD_ID
    k = valid.sum(axis=1)
    if (k < 1).any() or (valid != (np.arange(idx.shape[1]) < k[:, None])).any():
        raise ValueError("SparseQ rows need >= 1 index and padding only at the end")
    if (np.diff(idx, axis=1)[valid[:, 1:]] <= 0).any() or (idx[valid] < 0).any() or \
            (idx[valid] > 0xFFFFFFFF).any():
        raise ValueError("SparseQ indices must be strictly ascending and in [0, 2**32)")
    if (np.where(valid, cnt < 1, cnt != 0)).any() or (cnt.sum(axis=1) != q.total).any():
        raise ValueError("SparseQ counts must be >= 1, 0 at padding, and sum to 2**quant_bits")
    return idx, cnt, valid, k


def _column_probs(counts: np.ndarray, multi: np.ndarray, m: int, total: int) -> np.ndarray:
    """q̃ rows of the multi-entry rows, one per coded column: [γ' * m, width] float64."""
    return np.repeat(counts[multi] / float(total), m, axis=0)


def _bucket_probs(gap_rows: np.ndarray, ga: int, cnt_rows: np.ndarray, ca: int) -> np.ndarray:
    """One probability row per bucket symbol, gaps then counts: [N + N', max(ga, ca, 2)]."""
    probs = np.zeros((gap_rows.size + cnt_rows.size, max(ga, ca, 2)))
    probs[: gap_rows.size, :ga] = GAP_TABLES[ga][0][gap_rows]
    probs[gap_rows.size :, :ca] = COUNT_TABLES[ca][0][cnt_rows]
    return probs


def encode_sparse_rows(
    q: SparseQ, tokens: torch.Tensor, alternatives: torch.Tensor | None
) -> tuple[bytes, list[int]]:
    """Pack q̃ rows, spine tokens [γ] and alternatives [γ, m - 1]. Returns (payload, header).

    header = [γ, m, quant_bits, kw, ga, ca]; raises ValueError on an inconsistent draft.
    """
    idx, cnt, valid, k = _check_sparse_q(q)
    gamma = idx.shape[0]
    spine = tokens.numpy().astype(np.int64).reshape(gamma, 1)
    alts = np.zeros((gamma, 0), np.int64) if alternatives is None else alternatives.numpy().astype(np.int64)
    if alts.ndim != 2 or alts.shape[0] != gamma:
        raise ValueError(f"alternatives must be [{gamma}, m - 1], got {alts.shape}")
    cols = _columns_of(idx, np.concatenate([spine, alts], axis=1), "draft token or alternative")
    prev = np.concatenate([np.full((gamma, 1), -1), idx[:, :-1]], axis=1)
    not_last = np.arange(idx.shape[1]) < (k - 1)[:, None]  # [γ, k]
    return pack_rows(k, (idx - prev - 1)[valid], cnt[not_last], cols, q.quant_bits, cnt)


def pack_rows(k: np.ndarray, gaps: np.ndarray, counts_rest: np.ndarray, cols: np.ndarray,
              quant_bits: int, counts: np.ndarray | None = None,
              pairs: np.ndarray | None = None) -> tuple[bytes, list[int]]:
    """The payload of given field values, *not* checked (tests use it to build hostile payloads).

    k [γ] >= 1; gaps [Σk] >= 0; counts_rest [Σk - γ] >= 1 (all but each row's last count);
    cols [γ, m]; counts [γ, max k] (padded rows, for the column model; rebuilt if None);
    pairs [γ] (table choices; the cheapest if None). Returns (payload, header).
    """
    gaps, counts_rest = np.asarray(gaps, np.int64), np.asarray(counts_rest, np.int64)
    gamma, m = cols.shape
    rows = np.repeat(np.arange(gamma), k)  # [N] row of each entry
    width = int(k.max())
    not_last = np.arange(width) < (k - 1)[:, None]  # [γ, width]
    rows_nl = rows[not_last[np.arange(width) < k[:, None]]]
    gap_b = bit_length(gaps)
    cnt_s = bit_length(counts_rest) - 1  # count bucket symbols
    ga = int(gap_b.max()) + 1
    ca = int(cnt_s.max()) + 1 if cnt_s.size else 1
    if pairs is None:
        gap_t = _best_tables(gap_b, rows, gamma, GAP_TABLES[ga][1])
        cnt_t = _best_tables(cnt_s, rows_nl, gamma, COUNT_TABLES[ca][1])
        pairs = gap_t * NUM_COUNT_TABLES + cnt_t
    kw = int(bit_length(k.max() - 1))
    multi = k >= 2
    if counts is None:
        counts = np.zeros((gamma, width), dtype=np.int64)
        counts[not_last] = counts_rest
        counts[np.arange(gamma), k - 1] = (1 << quant_bits) - counts.sum(axis=1)

    enc = Encoder()
    if kw:
        enc.uniform(np.concatenate([k - 1, pairs]), np.repeat([1 << kw, NUM_TABLE_PAIRS], gamma))
    else:
        enc.uniform(pairs, NUM_TABLE_PAIRS)
    enc.categorical(np.concatenate([gap_b, cnt_s]),
                    _bucket_probs(pairs[rows] // NUM_COUNT_TABLES, ga,
                                  pairs[rows_nl] % NUM_COUNT_TABLES, ca))
    syms, sizes = split_mantissas(np.concatenate([gaps, counts_rest]),
                                  np.concatenate([gap_b, cnt_s + 1]))
    enc.uniform(syms, sizes)
    enc.categorical(cols[multi].ravel(), _column_probs(np.maximum(counts, 0), multi, m,
                                                       1 << quant_bits))
    return enc.to_bytes(), [gamma, m, quant_bits, kw, ga, ca]


def _best_tables(buckets: np.ndarray, rows: np.ndarray, num_rows: int, bits: np.ndarray) -> np.ndarray:
    """Per row, the table with the fewest bucket bits: buckets [N] of rows [N] -> [num_rows]."""
    hist = np.zeros((num_rows, bits.shape[1]))
    np.add.at(hist, (rows, buckets), 1.0)
    return (hist @ bits.T).argmin(axis=1)


def decode_sparse_rows(
    fields: list[Any], limits: Any
) -> tuple[SparseQ, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``encode_sparse_rows`` from frame fields [γ, m, b, kw, ga, ca, payload], fully
    validated."""
    gamma = get_int(fields[0], "gamma", 1, limits.max_gamma)
    m = get_int(fields[1], "num_candidates", 1, limits.max_candidates)
    b = get_int(fields[2], "quant_bits", 1, MAX_QUANT_BITS)
    kw = get_int(fields[3], "kw", 0, MAX_QUANT_BITS)
    ga = get_int(fields[4], "gap_alphabet", 1, GAP_BUCKETS)
    ca = get_int(fields[5], "count_alphabet", 1, COUNT_BUCKETS)
    dec = Decoder(get_bin(fields[6], "payload"))

    if kw:
        head = dec.uniform(np.repeat(np.array([1 << kw, NUM_TABLE_PAIRS], np.int32), gamma))
        k, pairs = head[:gamma] + 1, head[gamma:]  # [γ], [γ]
    else:
        k, pairs = np.ones(gamma, dtype=np.int64), dec.uniform(NUM_TABLE_PAIRS, gamma)
    if k.max() > min(limits.max_k, limits.vocab_size, 1 << b):
        raise ProtocolError(Reason.TOO_LARGE, f"support size {int(k.max())} > max_k, vocab_size "
                            "or 2**quant_bits")
    n_entries = int(k.sum())
    rows = np.repeat(np.arange(gamma), k)  # [N]
    starts = np.cumsum(k) - k
    col = np.arange(n_entries) - starts[rows]
    not_last = col < k[rows] - 1
    rows_nl = rows[not_last]
    buckets = dec.categorical(_bucket_probs(pairs[rows] // NUM_COUNT_TABLES, ga,
                                            pairs[rows_nl] % NUM_COUNT_TABLES, ca))
    buckets[n_entries:] += 1  # count buckets: bit_length(count) >= 1
    values = join_mantissas(buckets, dec.uniform)
    gaps, counts_rest = values[:n_entries], values[n_entries:]

    csum = np.cumsum(gaps + 1)  # index = csum - csum at the row's start + the row's first gap
    indices_e = csum - (csum[starts] - gaps[starts])[rows]
    if indices_e.max() >= limits.vocab_size:
        raise ProtocolError(Reason.BAD_INDICES, f"index {int(indices_e.max())} >= vocab_size")
    counts_e = np.empty(n_entries, dtype=np.int64)
    counts_e[not_last] = counts_rest
    last = (1 << b) - np.bincount(rows_nl, weights=counts_rest, minlength=gamma).astype(np.int64)
    if last.min() < 1:
        raise ProtocolError(Reason.BAD_COUNTS, "counts exceeding 2**quant_bits")
    counts_e[~not_last] = last

    width = int(k.max())
    indices = np.full((gamma, width), PAD_ID, dtype=np.int32)
    counts = np.zeros((gamma, width), dtype=np.int32)
    indices[rows, col] = indices_e
    counts[rows, col] = counts_e
    multi = k >= 2
    token_cols = np.zeros((gamma, m), dtype=np.int64)
    if multi.any():
        token_cols[multi] = dec.categorical(_column_probs(counts, multi, m, 1 << b)).reshape(-1, m)
        if (token_cols >= k[:, None]).any():
            raise ProtocolError(Reason.NOT_IN_SUPPORT, "a draft token's column is outside its support")
    dec.finish()
    cands = indices[np.arange(gamma)[:, None], token_cols].astype(np.int64)  # [γ, m]
    q = SparseQ(torch.from_numpy(indices), torch.from_numpy(counts), b)
    alts = torch.from_numpy(cands[:, 1:]) if m > 1 else None
    return q, torch.from_numpy(cands[:, 0]), alts
