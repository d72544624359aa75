"""Entropy models and a guarded ANS coder for the sparse-draft payload (layout: sparse_payload.py).

Integers are coded as a *bucket* plus raw *mantissa* bits (Elias-gamma shape, with the bucket
entropy-coded): ``v >= 0`` has bucket ``n = v.bit_length()`` and, for ``n >= 2``, the ``n - 1``
bits of ``v - 2**(n - 1)`` as the mantissa. Buckets go through a static categorical table that the
encoder picks per row and sends (one Uniform symbol); mantissas through a Uniform model.

The coder is ``constriction``'s ANS (Rust; `DefaultAnsCoder`, 32-bit words). NOTE on exactness:
both sides must build bit-identical models. Every table here is made from integers by integer
arithmetic (no libm), and the probabilities handed to constriction are ``int / int`` in float64
(IEEE division: the same on every platform); constriction's model quantization of identical floats
is integer/IEEE code. A library upgrade that changed that quantization would change the bytes:
``tests/unit/test_codec.py::test_golden_bytes`` pins them, and pyproject pins the minor version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import constriction
import numpy as np

from vllm_tslt.protocol.errors import ProtocolError, Reason

_model = constriction.stream.model
_AnsCoder = constriction.stream.stack.AnsCoder
CATEGORICAL = _model.Categorical(perfect=False)  # family: one probability row per symbol
UNIFORM = _model.Uniform()  # family: one size (>= 2) per symbol

GAP_BUCKETS = 33  # bit_length of a gap < 2**32
COUNT_BUCKETS = 17  # bit_length - 1 of a count in [1, 2**16]
MANTISSA_SPLIT = 16  # mantissas wider than this travel as two Uniform symbols (hi, lo)

# Means of the geometric gap tables, ~sqrt(2) apart (exact dyadic numbers).
GAP_MEANS = tuple(m * 2**e for e in range(-1, 18) for m in (1.0, 1.5))
_Q = 62  # fixed-point fraction bits for the table arithmetic


def _geometric_bucket_table(mean: float) -> np.ndarray:
    """Frequencies [GAP_BUCKETS] of the buckets of a geometric variable with this mean.

    P(g) = (1 - ρ) ρ^g, ρ = mean / (1 + mean); bucket 0 is g = 0 and bucket n >= 1 is
    g in [2^(n-1), 2^n): mass ρ^(2^(n-1)) - ρ^(2^n). Fixed-point integers, repeated squaring.
    """
    num, den = mean.as_integer_ratio()
    one = 1 << _Q
    rho = (num << _Q) // (num + den)  # ρ = num / (num + den)
    powers = [rho]  # rho^(2^i)
    for _ in range(GAP_BUCKETS - 1):
        powers.append(powers[-1] * powers[-1] >> _Q)
    mass = [one - rho] + [powers[n - 1] - powers[n] for n in range(1, GAP_BUCKETS)]
    return np.array([max(1, m >> (_Q - 20)) for m in mass], dtype=np.int64)


def _count_bucket_table(peak: int) -> np.ndarray:
    """Frequencies [COUNT_BUCKETS]: mode at ``peak``, halving per bucket below, quartering above
    (a row's counts crowd just above the truncation threshold and thin out towards the top)."""
    s = np.arange(COUNT_BUCKETS)
    log_f = np.where(s <= peak, 24 - (peak - s), 24 - 2 * (s - peak))
    return np.left_shift(1, np.maximum(log_f, 0)).astype(np.int64)


def _tables(freqs: list[np.ndarray], max_symbols: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per alphabet size a (index a, 1..max_symbols; only buckets < a can occur): (probabilities
    [T, a] float64 for the coder, code lengths [T, a] bits for the encoder's choice of table)."""
    f = np.stack(freqs).astype(np.float64)
    out = [(np.zeros((len(freqs), 0)), np.zeros((len(freqs), 0)))]
    for a in range(1, max_symbols + 1):
        probs = f[:, :a] / f[:, :a].sum(axis=1, keepdims=True)
        out.append((probs, -np.log2(probs)))
    return out


GAP_TABLES = _tables([_geometric_bucket_table(m) for m in GAP_MEANS], GAP_BUCKETS)
COUNT_TABLES = _tables([_count_bucket_table(p) for p in range(COUNT_BUCKETS)], COUNT_BUCKETS)
NUM_GAP_TABLES = len(GAP_MEANS)
NUM_COUNT_TABLES = COUNT_BUCKETS
NUM_TABLE_PAIRS = NUM_GAP_TABLES * NUM_COUNT_TABLES  # a row's (gap table, count table)


def bit_length(x: np.ndarray) -> np.ndarray:
    """Elementwise int.bit_length of non-negative int64 (< 2**53): frexp's exponent is exact."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def split_mantissas(values: np.ndarray, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mantissas of bucketed values -> (symbols, Uniform sizes), fields <= MANTISSA_SPLIT bits.

    Every mantissa of width w >= 1 gives its low min(w, 16) bits; those with w > 16 then give
    their high w - 16 bits after all the low parts.
    """
    width = np.maximum(buckets - 1, 0)
    has = width > 0
    v, w = values[has], width[has]
    mant = v - (np.int64(1) << w)
    lo_w = np.minimum(w, MANTISSA_SPLIT)
    big = w > MANTISSA_SPLIT
    syms = np.concatenate([mant & ((np.int64(1) << lo_w) - 1), mant[big] >> MANTISSA_SPLIT])
    sizes = np.concatenate([np.int64(1) << lo_w, np.int64(1) << (w[big] - MANTISSA_SPLIT)])
    return syms, sizes


def join_mantissas(buckets: np.ndarray, read: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Inverse of ``split_mantissas``: buckets [N] and a reader of Uniform symbols -> values [N]."""
    width = np.maximum(buckets - 1, 0)
    has = width > 0
    w = width[has]
    lo_w = np.minimum(w, MANTISSA_SPLIT)
    big = w > MANTISSA_SPLIT
    lo = read(np.int64(1) << lo_w) if w.size else np.zeros(0, np.int64)
    hi = read(np.int64(1) << (w[big] - MANTISSA_SPLIT)) if big.any() else np.zeros(0, np.int64)
    mant = lo.copy()
    mant[big] |= hi << MANTISSA_SPLIT
    values = np.where(buckets > 0, 1, 0).astype(np.int64)  # buckets 0 and 1: the values 0, 1
    values[has] = (np.int64(1) << w) + mant
    return values


class Encoder:
    """Collects sections in *decode* order; ``to_bytes`` pushes them onto an ANS stack reversed."""

    def __init__(self) -> None:
        self._sections: list[tuple[np.ndarray, Any, np.ndarray]] = []

    def uniform(self, symbols: np.ndarray, sizes: np.ndarray | int) -> None:
        symbols = np.asarray(symbols, dtype=np.int64).ravel()
        sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), symbols.shape)
        if symbols.size:
            self._sections.append((symbols, UNIFORM, sizes))

    def categorical(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        """symbols [N], probs [N, A] float64 (one distribution per symbol)."""
        if symbols.size:
            self._sections.append((np.asarray(symbols, dtype=np.int64), CATEGORICAL, probs))

    def to_bytes(self) -> bytes:
        coder = _AnsCoder()
        for symbols, model, params in reversed(self._sections):
            if model is UNIFORM:
                params = params.astype(np.int32)
            coder.encode_reverse(symbols.astype(np.int32), model, params)
        return coder.get_compressed().astype("<u4").tobytes()


class Decoder:
    """Pops sections in order; any failure inside the coder is ``ProtocolError(BAD_BITSTREAM)``."""

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise ProtocolError(Reason.BAD_BITSTREAM, f"{len(data)} bytes is not whole 32-bit words")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        self._coder = _guarded(lambda: _AnsCoder(words))

    def uniform(self, sizes: np.ndarray | int, count: int | None = None) -> np.ndarray:
        sizes = np.asarray(sizes, dtype=np.int32)
        if sizes.ndim == 0:
            sizes = np.full(count, int(sizes), dtype=np.int32)
        if sizes.size == 0:
            return np.zeros(0, dtype=np.int64)
        return _guarded(lambda: self._coder.decode(UNIFORM, sizes)).astype(np.int64)

    def categorical(self, probs: np.ndarray) -> np.ndarray:
        if probs.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        return _guarded(lambda: self._coder.decode(CATEGORICAL, probs)).astype(np.int64)

    def finish(self) -> None:
        """Nothing may follow the last section (every valid payload is exactly what it encodes)."""
        if not self._coder.is_empty():
            raise ProtocolError(Reason.BAD_BITSTREAM, "data left over after the payload")


def _guarded(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # NOTE: a Rust panic surfaces as pyo3's PanicException (BaseException)
        raise ProtocolError(Reason.BAD_BITSTREAM, f"entropy decoder: {type(e).__name__}: {e}") from e
