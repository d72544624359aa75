"""Compiled (numba) loops for coding a draft payload: the fast path of the edge and of devices
that have numba.

A γ = 4 draft has ~100 entries, so the numpy reference in sparse_payload.py spends its time in the
~40 numpy calls between the coder's calls, not in arithmetic (issue 16: decode <= 50 µs, encode <=
100 µs). These loops do the same work in a few calls: three for decoding, one (plus ``layout``)
for encoding. numba is not a dependency of vllm-tslt: it comes with vLLM, so every edge has it; a
device has it if its user installs it (`pip install numba`; the device extra stays light without
it). Without numba the numpy code runs. Both give identical bytes, results and refusals
(tests/unit/test_codec.py::test_compiled_decode_matches_numpy runs the fuzzers' hostile payloads
through both decoders, test_compiled_encode_matches_numpy random and invalid drafts through both
encoders).

NOTE on compile time: compiling these takes seconds (8 s on a loaded 2-core box), and the edge
decodes drafts in its I/O thread. So ``ready`` compiles them in a background thread on first use
and the numpy code decodes until they are ready; ``cache=True`` keeps the machine code in
``__pycache__`` (or numba's cache directory), so a later process loads it in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

AVAILABLE = importlib.util.find_spec("numba") is not None
if AVAILABLE:  # a helper both kernels call: plain Python here, inlined into them when compiled
    from numba.extending import register_jitable as _helper
else:
    def _helper(fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

# Status codes of build_rows (sparse_payload.py maps them to ProtocolError reasons).
OK, BAD_INDICES, BAD_COUNTS = 0, 1, 2
# Status codes of encode_fields (sparse_payload.py maps them to the reference's ValueErrors).
BAD_LAYOUT, BAD_ORDER, BAD_SPARSE_COUNTS, NOT_IN_SUPPORT = 1, 2, 3, 4

_kernels: dict[str, Any] = {}
_ready: dict[str, Any] = {}
_lock = threading.Lock()  # creating the kernels
_start_lock = threading.Lock()  # starting the compiling thread
_started = False


def kernels() -> dict[str, Any]:
    """The jitted functions (each compiles at its first call)."""
    with _lock:
        if not _kernels:
            from numba import njit

            jit = njit(cache=True, nogil=True)
            _kernels.update(layout=jit(_layout), mantissa_sizes=jit(_mantissa_sizes),
                            build_rows=jit(_build_rows), pick=jit(_pick),
                            encode_fields=jit(_encode_fields))
    return _kernels


def ready(warm_up: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
    """The compiled functions once ``warm_up(kernels())`` (a decode that calls each of them with
    the argument types of every decode) has run in a background thread; None until then (and for
    good if compiling failed)."""
    global _started
    if _ready or not AVAILABLE or _started:  # NOTE: never waits for the compiling thread
        return _ready or None
    with _start_lock:
        if not _started:
            _started = True
            threading.Thread(target=_compile, args=(warm_up,), name="tslt-codec-compile",
                             daemon=True).start()
    return None


def mark_ready(fn: dict[str, Any]) -> None:
    """Use ``fn`` (``kernels()``, warmed up by the caller) from now on."""
    _ready.update(fn)


def _compile(warm_up: Callable[[dict[str, Any]], None]) -> None:
    try:
        fn = kernels()
        warm_up(fn)
    except Exception:
        logger.warning("compiling the draft decoder failed; decoding with numpy", exc_info=True)
        return
    _ready.update(fn)


def _layout(head: np.ndarray, gamma: int, kw: int, table: np.ndarray,
            num_count_tables: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Payload head [k_j - 1 (if kw)..., pair_j...] -> (k [γ] int64, max k, bucket probabilities
    [Σk + Σ(k - 1), A] float64: row j's gap table k_j times, then its count table k_j - 1 times)."""
    k = np.ones(gamma, dtype=np.int64)
    if kw:
        for j in range(gamma):
            k[j] = head[j] + 1
    pairs = head[gamma:] if kw else head
    n_rows = 2 * k.sum() - gamma
    probs = np.empty((n_rows, table.shape[1]), dtype=np.float64)
    num_gap_tables = table.shape[0] - num_count_tables
    r = 0
    for j in range(gamma):
        src = table[pairs[j] // num_count_tables]
        for _ in range(k[j]):
            probs[r] = src
            r += 1
    for j in range(gamma):
        src = table[num_gap_tables + pairs[j] % num_count_tables]
        for _ in range(k[j] - 1):
            probs[r] = src
            r += 1
    return k, k.max(), probs


def _mantissa_sizes(bits: np.ndarray, n_entries: int, split: int) -> np.ndarray:
    """Bucket symbols [N + N'] (gaps, then counts: +1 in place, giving bit lengths) -> the
    Uniform sizes of the mantissas: low parts min(2**(n-1), 2**split) of every n >= 2, then the
    high parts 2**(n-1-split) of those wider than ``split`` bits (entropy.split_mantissas)."""
    for i in range(n_entries, bits.size):
        bits[i] += 1
    n_lo = 0
    n_hi = 0
    for i in range(bits.size):
        if bits[i] > 1:
            n_lo += 1
            if bits[i] - 1 > split:
                n_hi += 1
    sizes = np.empty(n_lo + n_hi, dtype=np.int32)
    lo = 0
    hi = n_lo
    for i in range(bits.size):
        w = bits[i] - 1
        if w > 0:
            sizes[lo] = 1 << min(w, split)
            lo += 1
            if w > split:
                sizes[hi] = 1 << (w - split)
                hi += 1
    return sizes


def _build_rows(bits: np.ndarray, mant: np.ndarray, k: np.ndarray, quant_bits: int,
                vocab_size: int, m: int,
                split: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Bit lengths [N + N'] and mantissa fields -> (indices [γ, max k] int32 PAD-padded, counts
    [γ, max k] int32, the column model [γ' * m, max k] float64 of the rows with k >= 2, status).
    Checks, in the reference's order: every index < vocab_size (BAD_INDICES), then each row's last
    count 2**b - Σ others >= 1 (BAD_COUNTS)."""
    values = np.empty(bits.size, dtype=np.int64)  # gaps, then counts but each row's last
    n_lo = 0
    for i in range(bits.size):
        if bits[i] > 1:
            n_lo += 1
    lo = 0
    hi = n_lo
    for i in range(bits.size):
        n = np.int64(bits[i])
        if n <= 1:
            values[i] = n  # bit length 0: the value 0; 1: the value 1
        else:
            values[i] = (np.int64(1) << (n - 1)) + mant[lo]
            lo += 1
            if n - 1 > split:
                values[i] += np.int64(mant[hi]) << split
                hi += 1
    gamma = k.size
    width = k.max()
    indices = np.full((gamma, width), -1, dtype=np.int32)
    counts = np.zeros((gamma, width), dtype=np.int32)
    e = 0
    largest = np.int64(-1)
    for j in range(gamma):
        index = np.int64(-1)
        for c in range(k[j]):
            index += values[e] + 1
            e += 1
            indices[j, c] = index  # NOTE: wraps past 2**31 - 1, as numpy's astype(int32)
        largest = max(largest, index)
    if largest >= vocab_size:
        return indices, counts, np.empty((0, width)), BAD_INDICES
    total = np.int64(1) << quant_bits
    for j in range(gamma):
        rest = np.int64(0)
        for c in range(k[j] - 1):
            rest += values[e]
            counts[j, c] = values[e]
            e += 1
        if total - rest < 1:
            return indices, counts, np.empty((0, width)), BAD_COUNTS
        counts[j, k[j] - 1] = total - rest
    return indices, counts, _column_model(counts, k, m, total), OK


@_helper
def _column_model(counts: np.ndarray, k: np.ndarray, m: int, total: int) -> np.ndarray:
    """The model of the token columns: q̃ of each row with k >= 2, m times in a row (one per
    candidate), as wide as the widest row: [γ' * m, max k] float64 (counts [γ, >= max k])."""
    multi = 0
    for j in range(k.size):
        if k[j] >= 2:
            multi += 1
    probs = np.zeros((multi * m, k.max()), dtype=np.float64)
    r = 0
    for j in range(k.size):
        if k[j] >= 2:
            for _ in range(m):
                for c in range(k[j]):
                    probs[r, c] = counts[j, c] / float(total)
                r += 1
    return probs


def _pick(indices: np.ndarray, k: np.ndarray, cols: np.ndarray, m: int) -> tuple[np.ndarray, bool]:
    """Decoded columns [γ' * m] of the rows with k >= 2 -> candidates [γ, m] int64 (k = 1: the
    row's one index); False if a column is outside its row's support."""
    gamma = k.size
    cands = np.empty((gamma, m), dtype=np.int64)
    r = 0
    for j in range(gamma):
        for i in range(m):
            c = 0
            if k[j] >= 2:
                c = cols[r]
                r += 1
                if c >= k[j]:
                    return cands, False
            cands[j, i] = indices[j, c]
    return cands, True


def _encode_fields(idx: np.ndarray, cnt: np.ndarray, total: int, cands: np.ndarray,
                   split: int) -> tuple:
    """An encoder's field values from a padded SparseQ (indices, counts [γ, w] int64, PAD -1),
    its row total 2**b and the candidates [γ, m] int64 (spine, then alternatives); checked in the
    reference's order (sparse_payload._check_sparse_q, _columns_of). Returns (status, k [γ],
    bucket symbols [N + N - γ] int32, mantissa symbols and Uniform sizes int32, columns [γ' * m]
    int32 and their model [γ' * m, w] float64 of the rows with k >= 2, the bucket histogram
    [γ, ga + ca] float64 (_best_pairs), ga, ca)."""
    gamma, width = idx.shape
    m = cands.shape[1]
    empty_i = np.zeros(0, dtype=np.int32)
    empty_f = np.zeros((0, width), dtype=np.float64)
    k = np.zeros(gamma, dtype=np.int64)
    for j in range(gamma):  # >= 1 index, padding only at the end
        n = 0
        while n < width and idx[j, n] != -1:
            n += 1
        if n == 0:
            return BAD_LAYOUT, k, empty_i, empty_i, empty_i, empty_i, empty_f, empty_f, 0, 0
        for c in range(n, width):
            if idx[j, c] != -1:
                return BAD_LAYOUT, k, empty_i, empty_i, empty_i, empty_i, empty_f, empty_f, 0, 0
        k[j] = n
    n_entries = k.sum()
    values = np.empty(2 * n_entries - gamma, dtype=np.int64)  # gaps, then counts but the last
    e = 0
    for j in range(gamma):  # strictly ascending from >= 0, below 2**32
        prev = np.int64(-1)
        for c in range(k[j]):
            gap = idx[j, c] - prev - 1
            if gap < 0 or idx[j, c] > 4294967295:
                return BAD_ORDER, k, empty_i, empty_i, empty_i, empty_i, empty_f, empty_f, 0, 0
            values[e] = gap
            e += 1
            prev = idx[j, c]
    for j in range(gamma):  # counts >= 1, 0 at padding, summing to 2**b
        row = np.int64(0)
        for c in range(width):
            if (c < k[j] and cnt[j, c] < 1) or (c >= k[j] and cnt[j, c] != 0):
                return BAD_SPARSE_COUNTS, k, empty_i, empty_i, empty_i, empty_i, empty_f, \
                    empty_f, 0, 0
            row += cnt[j, c]
        if row != total:
            return BAD_SPARSE_COUNTS, k, empty_i, empty_i, empty_i, empty_i, empty_f, empty_f, 0, 0
    for j in range(gamma):
        for c in range(k[j] - 1):
            values[e] = cnt[j, c]
            e += 1
    multi = 0
    for j in range(gamma):
        if k[j] >= 2:
            multi += 1
    cols = np.zeros(multi * m, dtype=np.int32)
    r = 0
    for j in range(gamma):  # every candidate in its row's support (the first matching column)
        for i in range(m):
            c = 0
            while c < k[j] and idx[j, c] != cands[j, i]:
                c += 1
            if c == k[j]:
                return NOT_IN_SUPPORT, k, empty_i, empty_i, empty_i, empty_i, empty_f, \
                    empty_f, 0, 0
            if k[j] >= 2:
                cols[r] = c
                r += 1
    # the column model as the decoder builds it: as wide as the widest row, not the padding
    col_probs = _column_model(cnt, k, m, total)
    # Buckets: bit_length(gap), bit_length(count) - 1; mantissas below the leading one.
    symbols = np.empty(values.size, dtype=np.int32)
    ga = 1
    ca = 1
    n_lo = 0
    n_hi = 0
    for i in range(values.size):
        n = 0
        v = values[i]
        while v > 0:  # bit_length
            v >>= 1
            n += 1
        if i < n_entries:
            symbols[i] = n
            ga = max(ga, n + 1)
        else:
            symbols[i] = n - 1
            ca = max(ca, n)
        if n > 1:
            n_lo += 1
            if n - 1 > split:
                n_hi += 1
    mant = np.empty(n_lo + n_hi, dtype=np.int32)
    sizes = np.empty(n_lo + n_hi, dtype=np.int32)
    lo = 0
    hi = n_lo
    for i in range(values.size):
        n = symbols[i] + (1 if i >= n_entries else 0)
        if n > 1:
            top = np.int64(1) << (n - 1)
            v = values[i] - top
            lo_size = min(top, np.int64(1) << split)
            mant[lo] = v & (lo_size - 1)
            sizes[lo] = lo_size
            lo += 1
            if top > (np.int64(1) << split):
                mant[hi] = v >> split
                sizes[hi] = top >> split
                hi += 1
    hist = np.zeros((gamma, ga + ca), dtype=np.float64)
    e = 0
    for j in range(gamma):
        for _ in range(k[j]):
            hist[j, symbols[e]] += 1.0
            e += 1
    for j in range(gamma):
        for _ in range(k[j] - 1):
            hist[j, ga + symbols[e]] += 1.0
            e += 1
    return OK, k, symbols, mant, sizes, cols, col_probs, hist, ga, ca
