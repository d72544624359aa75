"""The entropy-coded payload of a draft's sparse q̃ rows + token columns (protocol v2; v3 kept
it).

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
from vllm_tslt.protocol import compiled
from vllm_tslt.protocol.entropy import (
    COUNT_BUCKETS,
    COUNT_TABLES,
    GAP_BUCKETS,
    GAP_TABLES,
    MANTISSA_SPLIT,
    NUM_COUNT_TABLES,
    Decoder,
    Encoder,
    bit_length,
    bucket_probs,
    bucket_table,
    head_sizes,
    join_mantissas,
    narrow_fields,
    split_mantissas,
)
from vllm_tslt.protocol.errors import ProtocolError, Reason, get_bin, get_int

# NOTE on speed (issue 16: decode <= 50 µs, encode <= 100 µs per γ = 4 draft): a draft has a few
# dozen entries, so every numpy call costs more than its arithmetic. Per-row values (k, table
# choices) are Python lists, entry values are flat numpy arrays in row-major order, and the padded
# [γ, max k] layout is built with one boolean mask; the coder is called once per section.

# Encode and decode with the compiled loops (compiled.py) when numba is there (once compiled in the
# background; numpy until then); tests switch it off to run the numpy reference.
USE_COMPILED = compiled.AVAILABLE
# encode_fields' status -> the reference's ValueError (_check_sparse_q, _columns_of).
_ENCODE_ERRORS = {
    compiled.BAD_LAYOUT: "SparseQ rows need >= 1 index and padding only at the end",
    compiled.BAD_ORDER: "SparseQ indices must be strictly ascending and in [0, 2**32)",
    compiled.BAD_SPARSE_COUNTS: "SparseQ counts must be >= 1, 0 at padding, and sum to "
                                "2**quant_bits",
    compiled.NOT_IN_SUPPORT: "a draft token or alternative is not in its row's support",
}

_COLS = np.arange(1 << MAX_QUANT_BITS)  # column numbers, sliced to a draft's width
_MAX_INDEX = (1 << 32) - 1


def _check_sparse_q(q: SparseQ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (indices [γ, k] int64, counts [γ, k], valid [γ, k] bool, gaps [N] int64 of the valid
    entries, row-major: index - previous index - 1, the row's first index for its first entry);
    ValueError if inconsistent."""
    idx, cnt = _sparse_arrays(q)
    wide = idx.dtype.itemsize > 4 or idx.dtype.kind == "u"  # may hold indices >= 2**31
    idx = idx.astype(np.int64)
    valid = idx != PAD_ID
    if not valid[:, 0].all() or (valid[:, 1:] > valid[:, :-1]).any():
        raise ValueError("SparseQ rows need >= 1 index and padding only at the end")
    steps = np.empty_like(idx)  # index - previous index (-1 before each row)
    np.add(idx[:, 0], 1, out=steps[:, 0])
    np.subtract(idx[:, 1:], idx[:, :-1], out=steps[:, 1:])
    gaps = steps[valid]
    gaps -= 1
    if gaps.min() < 0 or (wide and idx.max() > _MAX_INDEX):  # ascending from >= 0: gaps >= 0
        raise ValueError("SparseQ indices must be strictly ascending and in [0, 2**32)")
    # min(c, 1) == valid: counts >= 1 at valid entries, exactly 0 at padding
    if (np.minimum(cnt, 1) != valid).any() or (cnt.sum(axis=1) != q.total).any():
        raise ValueError("SparseQ counts must be >= 1, 0 at padding, and sum to 2**quant_bits")
    return idx, cnt, valid, gaps


def _sparse_arrays(q: SparseQ) -> tuple[np.ndarray, np.ndarray]:
    """(indices, counts) as numpy [γ, k]; ValueError unless their shapes and quant_bits fit."""
    idx = q.indices.numpy()
    cnt = q.counts.numpy()
    if idx.ndim != 2 or cnt.shape != idx.shape or idx.shape[1] == 0 or \
            not 1 <= q.quant_bits <= MAX_QUANT_BITS:
        raise ValueError("SparseQ must have matching [γ, k] indices/counts and quant_bits in 1..16")
    return idx, cnt


def _candidates(tokens: torch.Tensor, alternatives: torch.Tensor | None, gamma: int) -> np.ndarray:
    """Spine tokens [γ] and alternatives [γ, m - 1] -> [γ, m] (integers)."""
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or (
            alternatives is not None and (alternatives.dtype.is_floating_point
                                          or alternatives.dtype.is_complex)):
        raise ValueError("draft tokens and alternatives must be integer tensors")
    cands = tokens.numpy().reshape(gamma, 1)
    if alternatives is not None:
        alts = alternatives.numpy()
        if alts.ndim != 2 or alts.shape[0] != gamma:
            raise ValueError(f"alternatives must be [{gamma}, m - 1], got {alts.shape}")
        cands = np.concatenate([cands, alts], axis=1)
    return cands


def _columns_of(indices: np.ndarray, tokens: np.ndarray, what: str) -> np.ndarray:
    """Column of each token in its row's support: indices [γ, k], tokens [γ, c] -> [γ, c].
    (Valid indices are >= 0, so a token >= 0 can only match a valid entry, never padding.)"""
    if tokens.min() < 0:
        raise ValueError(f"a {what} is not in its row's support")
    hit = indices[:, None, :] == tokens[:, :, None]  # [γ, c, k]
    if not hit.any(axis=2).all():
        raise ValueError(f"a {what} is not in its row's support")
    return hit.argmax(axis=2)


def _column_probs(counts: np.ndarray, multi: list[int] | slice, m: int, total: int) -> np.ndarray:
    """q̃ rows of the multi-entry rows, one per coded column: [γ' * m, width] float64."""
    probs = counts[multi] / float(total)
    return probs if m == 1 else np.repeat(probs, m, axis=0)


def encode_sparse_rows(
    q: SparseQ, tokens: torch.Tensor, alternatives: torch.Tensor | None
) -> tuple[bytes, list[int]]:
    """Pack q̃ rows, spine tokens [γ] and alternatives [γ, m - 1]. Returns (payload, header).

    header = [γ, m, quant_bits, kw, ga, ca]; raises ValueError on an inconsistent draft.
    """
    if USE_COMPILED and (fn := compiled.ready(_warm_up)) is not None:
        return _encode_compiled(fn, q, tokens, alternatives)
    cands = _candidates(tokens, alternatives, _sparse_arrays(q)[0].shape[0])
    idx, cnt, valid, gaps = _check_sparse_q(q)
    cols = _columns_of(idx, cands, "draft token or alternative")
    # all counts but each row's last: those followed by a valid entry
    values = np.concatenate([gaps, cnt[:, :-1][valid[:, 1:]]], dtype=np.int64)
    k = valid.sum(axis=1).tolist()
    # the column model is as wide as the widest row, as the decoder builds it (a SparseQ padded
    # wider would code its columns under another model: the edge would decode other tokens)
    return _pack(k, values, cols, q.quant_bits, cnt[:, : max(k)])


def _encode_compiled(fn: dict[str, Any], q: SparseQ, tokens: torch.Tensor,
                     alternatives: torch.Tensor | None) -> tuple[bytes, list[int]]:
    """encode_sparse_rows with the compiled field builder (compiled.py): the same bytes and the
    same ValueErrors as the numpy code (tests/unit/test_codec.py)."""
    idx, cnt = _sparse_arrays(q)
    gamma = idx.shape[0]
    cands = _candidates(tokens, alternatives, gamma)
    status, k, symbols, mant, sizes, cols, col_probs, hist, ga, ca = fn["encode_fields"](
        np.ascontiguousarray(idx, dtype=np.int64), np.ascontiguousarray(cnt, dtype=np.int64),
        q.total, np.ascontiguousarray(cands, dtype=np.int64), MANTISSA_SPLIT)
    if status:
        raise ValueError(_ENCODE_ERRORS[status])
    k_list = k.tolist()
    pairs = _pairs_from_hist(hist, ga, ca)
    kw = (max(k_list) - 1).bit_length()
    head = np.array(([n - 1 for n in k_list] if kw else []) + pairs, dtype=np.int32)
    probs = fn["layout"](head, gamma, kw, bucket_table(ga, ca), NUM_COUNT_TABLES)[2]
    enc = Encoder()
    enc.uniform(head, head_sizes(kw, gamma))
    enc.categorical(symbols, probs)
    enc.uniform(mant, sizes)
    enc.categorical(cols, col_probs)
    return enc.to_bytes(), [gamma, cands.shape[1], q.quant_bits, kw, ga, ca]


def pack_rows(k: np.ndarray, gaps: np.ndarray, counts_rest: np.ndarray, cols: np.ndarray,
              quant_bits: int, counts: np.ndarray | None = None,
              pairs: np.ndarray | None = None) -> tuple[bytes, list[int]]:
    """The payload of given field values, *not* checked (tests use it to build hostile payloads).

    k [γ] >= 1; gaps [Σk] >= 0; counts_rest [Σk - γ] >= 1 (all but each row's last count);
    cols [γ, m]; counts [γ, max k] (padded rows, for the column model; rebuilt if None);
    pairs [γ] (table choices; the cheapest if None). Returns (payload, header).
    """
    k_list = [int(n) for n in k]
    if counts is None:
        counts = _padded_counts(k_list, counts_rest, quant_bits)
    values = np.concatenate([gaps, counts_rest]).astype(np.int64)
    return _pack(k_list, values, cols, quant_bits, counts, None if pairs is None else list(pairs))


def _pack(k: list[int], values: np.ndarray, cols: np.ndarray, quant_bits: int, counts: np.ndarray,
          pairs: list[int] | None = None) -> tuple[bytes, list[int]]:
    """k [γ]; values [Σk + Σk - γ] int64: the gaps, then all counts but each row's last; cols
    [γ, m]; counts [γ, max k]; pairs [γ] or None (the cheapest)."""
    gamma, m = cols.shape
    n_entries = sum(k)
    bits = bit_length(values)  # gap buckets, then count buckets + 1
    symbols = bits.copy()
    symbols[n_entries:] -= 1  # count bucket: bit_length(count) - 1
    ga = int(bits[:n_entries].max()) + 1
    ca = int(symbols[n_entries:].max()) + 1 if n_entries > gamma else 1
    pairs = _best_pairs(symbols, k, ga, ca) if pairs is None else [int(p) for p in pairs]
    kw = (max(k) - 1).bit_length()

    enc = Encoder()
    enc.uniform(np.array(([n - 1 for n in k] if kw else []) + pairs, dtype=np.int32),
                head_sizes(kw, gamma))
    enc.categorical(symbols, bucket_probs(pairs, k, ga, ca))
    enc.uniform(*split_mantissas(values, bits, narrow_fields(ga, ca)))
    multi = [j for j, n in enumerate(k) if n >= 2]
    if len(multi) == gamma:
        enc.categorical(cols.astype(np.int32).ravel(), _column_probs(counts, slice(None), m,
                                                                     1 << quant_bits))
    elif multi:
        enc.categorical(cols[multi].astype(np.int32).ravel(), _column_probs(counts, multi, m,
                                                                            1 << quant_bits))
    return enc.to_bytes(), [gamma, m, quant_bits, kw, ga, ca]


def _best_pairs(symbols: np.ndarray, k: list[int], ga: int, ca: int) -> list[int]:
    """Per row, the (gap table, count table) with the fewest bucket bits, as t * NC + u.

    symbols [N + N - γ]: the gap buckets (row-major), then the count buckets of all but each
    row's last entry. One histogram [γ, ga + ca] of both, then bits per table by a matmul.
    """
    gamma, width = len(k), ga + ca
    bins = np.array([j * width for j in range(gamma)] + [j * width + ga for j in range(gamma)])
    hist = np.bincount(bins.repeat(np.array(k + [n - 1 for n in k])) + symbols,
                       minlength=gamma * width).reshape(gamma, width).astype(np.float64)
    return _pairs_from_hist(hist, ga, ca)


def _pairs_from_hist(hist: np.ndarray, ga: int, ca: int) -> list[int]:
    """Bucket counts per row [γ, ga + ca] (gap buckets, then count buckets) -> the cheapest
    (gap table, count table) per row as t * NC + u (one code path for both encoders: the same
    float sums, the same ties, the same bytes)."""
    gap_t = (hist[:, :ga] @ GAP_TABLES[ga][1].T).argmin(axis=1)  # [γ] fewest gap-bucket bits
    cnt_t = (hist[:, ga:] @ COUNT_TABLES[ca][1].T).argmin(axis=1)
    return (gap_t * NUM_COUNT_TABLES + cnt_t).tolist()


def _padded_counts(k: list[int], counts_rest: np.ndarray, quant_bits: int) -> np.ndarray:
    """[γ, max k] int64 counts from all but each row's last count (the last: 2**b - the rest, or
    0 if that is negative)."""
    k_arr = np.array(k)
    counts = np.zeros((len(k), max(k)), dtype=np.int64)
    counts[_COLS[: max(k)] < k_arr[:, None] - 1] = counts_rest
    counts[np.arange(len(k)), k_arr - 1] = (1 << quant_bits) - counts.sum(axis=1)
    return np.maximum(counts, 0)  # a hostile test payload's counts may sum past 2**b


def decode_sparse_rows(
    fields: list[Any], limits: Any
) -> tuple[SparseQ, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``encode_sparse_rows`` from frame fields [γ, m, b, kw, ga, ca, payload], fully
    validated."""
    gamma, m, b, kw, ga, ca = _header(fields, limits)
    dec = Decoder(get_bin(fields[6], "payload"))
    if USE_COMPILED and (fn := compiled.ready(_warm_up)) is not None:
        return _decode_compiled(fn, dec, gamma, m, b, kw, ga, ca, limits)

    head = dec.uniform(head_sizes(kw, gamma)).tolist()
    k, pairs = ([n + 1 for n in head[:gamma]], head[gamma:]) if kw else ([1] * gamma, head)
    width = max(k)
    if width > min(limits.max_k, limits.vocab_size, 1 << b):
        raise ProtocolError(Reason.TOO_LARGE, f"support size {width} > max_k, vocab_size "
                            "or 2**quant_bits")
    bits = dec.categorical(bucket_probs(pairs, k, ga, ca))  # [N + N - γ] int32
    bits[sum(k):] += 1  # count buckets: bit_length(count) - 1
    values = join_mantissas(bits, dec.uniform, narrow_fields(ga, ca))  # gaps, then counts but the last
    return _rows_from_values(values, k, m, b, limits.vocab_size, dec)


def _decode_compiled(fn: dict[str, Any], dec: Decoder, gamma: int, m: int, b: int, kw: int, ga: int,
                     ca: int, limits: Any) -> tuple[SparseQ, torch.Tensor, torch.Tensor | None]:
    """decode_sparse_rows with compiled loops between the coder's calls (compiled.py); the same
    results and refusals as the numpy code below."""
    head = dec.uniform(head_sizes(kw, gamma))
    k, width, probs = fn["layout"](head, gamma, kw, bucket_table(ga, ca), NUM_COUNT_TABLES)
    if width > min(limits.max_k, limits.vocab_size, 1 << b):
        raise ProtocolError(Reason.TOO_LARGE, f"support size {width} > max_k, vocab_size "
                            "or 2**quant_bits")
    bits = dec.categorical(probs)  # [N + N - γ] int32
    mant = dec.uniform(fn["mantissa_sizes"](bits, int(k.sum()), MANTISSA_SPLIT))
    indices, counts, col_probs, status = fn["build_rows"](bits, mant, k, b, limits.vocab_size, m,
                                                          MANTISSA_SPLIT)
    if status == compiled.BAD_INDICES:
        raise ProtocolError(Reason.BAD_INDICES, f"an index >= vocab_size {limits.vocab_size}")
    if status == compiled.BAD_COUNTS:
        raise ProtocolError(Reason.BAD_COUNTS, "counts exceeding 2**quant_bits")
    cands, inside = fn["pick"](indices, k, dec.categorical(col_probs), m)  # [γ, m] int64
    if not inside:
        raise ProtocolError(Reason.NOT_IN_SUPPORT, "a draft token's column is outside its support")
    dec.finish()
    q = SparseQ(torch.from_numpy(indices), torch.from_numpy(counts), b)
    return q, torch.from_numpy(cands[:, 0]), torch.from_numpy(cands[:, 1:]) if m > 1 else None


def start_compiling_codec() -> None:
    """Start compiling the compiled encoder and decoder in their background thread now (the
    edge's hub and the device's draft loop call this at start, so the first drafts need not be
    coded with numpy while it compiles); nothing without numba."""
    if USE_COMPILED:
        compiled.ready(_warm_up)


def compile_codec() -> bool:
    """Compile the compiled encoder and decoder now, in this thread (seconds; well under one with
    numba's cache), instead of in the background at the first draft; True if drafts will be coded
    with them."""
    if not USE_COMPILED:
        return False
    if compiled.ready(_warm_up) is None:
        fn = compiled.kernels()
        _warm_up(fn)
        compiled.mark_ready(fn)
    return True


def _warm_up(fn: dict[str, Any]) -> None:
    """Compile the kernels by encoding and decoding one small draft (rows with k = 1 and k = 2)
    with them."""
    q = SparseQ(torch.tensor([[3, -1], [4, 5]], dtype=torch.int32),
                torch.tensor([[2, 0], [1, 1]], dtype=torch.int32), 1)
    payload, header = _encode_compiled(fn, q, torch.tensor([3, 5]), None)
    limits = type("Limits", (), {"max_k": 2, "vocab_size": 16})()
    _decode_compiled(fn, Decoder(payload), *header, limits)


def _rows_from_values(values: np.ndarray, k: list[int], m: int, b: int, vocab_size: int,
                      dec: Decoder) -> tuple[SparseQ, torch.Tensor, torch.Tensor | None]:
    """Gaps and counts (flat, row-major) -> padded SparseQ rows; then the token columns."""
    gamma, width = len(k), max(k)
    cols = _COLS[:width]
    # Rows 0..γ-1: the gaps of row j in columns < k_j; rows γ..2γ-1: its counts but the last.
    sizes = np.array(k + [n - 1 for n in k])[:, None]  # [2γ, 1]
    filled = cols < sizes  # [2γ, width]
    grid = np.zeros((2 * gamma, width), dtype=np.int64)
    grid[filled] = values
    sums = grid.cumsum(axis=1)
    # index = Σ gaps so far + column (each step is gap + 1)
    indices = np.where(filled[:gamma], sums[:gamma] + cols, PAD_ID)  # [γ, width] int64
    if indices.max() >= vocab_size:
        raise ProtocolError(Reason.BAD_INDICES, f"index {int(indices.max())} >= vocab_size")
    last = (1 << b) - sums[gamma:, -1]  # [γ] each row's last count: 2**b - the others
    if last.min() < 1:
        raise ProtocolError(Reason.BAD_COUNTS, "counts exceeding 2**quant_bits")
    counts = grid[gamma:]
    counts[filled[:gamma] > filled[gamma:]] = last  # at column k_j - 1

    # NOTE: a decoded column is < width (the coder's alphabet), so it stays in its row; a column
    # at or past k_j lands on padding (PAD_ID)
    cands = indices.take(_token_positions(dec, counts, k, m, b))  # [γ, m] int64
    if cands.min() < 0:
        raise ProtocolError(Reason.NOT_IN_SUPPORT, "a draft token's column is outside its support")
    dec.finish()
    q = SparseQ(torch.from_numpy(indices.astype(np.int32)), torch.from_numpy(counts.astype(np.int32)), b)
    alts = torch.from_numpy(cands[:, 1:]) if m > 1 else None
    return q, torch.from_numpy(cands[:, 0]), alts


def _token_positions(dec: Decoder, counts: np.ndarray, k: list[int], m: int, b: int) -> np.ndarray:
    """Decode the token columns (rows with k >= 2; column 0 for k = 1) -> [γ, m] positions
    j * width + column. counts [γ, width]."""
    gamma, width = counts.shape
    row_start = _COLS[: gamma * width : width, None]  # [γ, 1]
    if width == 1:  # every row has k = 1: no columns coded
        return row_start.repeat(m, axis=1)
    multi = [j for j, n in enumerate(k) if n >= 2]
    if len(multi) == gamma:
        got = dec.categorical(_column_probs(counts, slice(None), m, 1 << b)).reshape(gamma, m)
    else:
        got = np.zeros((gamma, m), dtype=np.int32)
        got[multi] = dec.categorical(_column_probs(counts, multi, m, 1 << b)).reshape(-1, m)
    return got + row_start


def _header(fields: list[Any], limits: Any) -> tuple[int, int, int, int, int, int]:
    """[γ, m, b, kw, ga, ca] checked against their ranges."""
    gamma, m, b, kw, ga, ca = fields[:6]
    if type(gamma) is int and type(m) is int and type(b) is int and type(kw) is int and \
            type(ga) is int and type(ca) is int and 1 <= gamma <= limits.max_gamma and \
            1 <= m <= limits.max_candidates and 1 <= b <= MAX_QUANT_BITS and \
            0 <= kw <= MAX_QUANT_BITS and 1 <= ga <= GAP_BUCKETS and 1 <= ca <= COUNT_BUCKETS:
        return gamma, m, b, kw, ga, ca  # NOTE: the fast path; the checks below say what is wrong
    return (get_int(gamma, "gamma", 1, limits.max_gamma),
            get_int(m, "num_candidates", 1, limits.max_candidates),
            get_int(b, "quant_bits", 1, MAX_QUANT_BITS), get_int(kw, "kw", 0, MAX_QUANT_BITS),
            get_int(ga, "gap_alphabet", 1, GAP_BUCKETS), get_int(ca, "count_alphabet", 1, COUNT_BUCKETS))
