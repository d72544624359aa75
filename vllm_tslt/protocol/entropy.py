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

import functools
import sys
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
    """Elementwise int.bit_length of non-negative int64 (< 2**53) -> int32: frexp's exponent is
    exact."""
    return np.frexp(x.astype(np.float64))[1]


@functools.cache
def bucket_table(ga: int, ca: int) -> np.ndarray:
    """[NUM_GAP_TABLES + NUM_COUNT_TABLES, max(ga, ca, 2)] float64: the gap tables cut to ga
    symbols, then the count tables cut to ca, zero-padded to one width (one categorical call codes
    all buckets of a draft; constriction gives a zero-probability symbol its smallest mass)."""
    out = np.zeros((NUM_GAP_TABLES + NUM_COUNT_TABLES, max(ga, ca, 2)))
    out[:NUM_GAP_TABLES, :ga] = GAP_TABLES[ga][0]
    out[NUM_GAP_TABLES:, :ca] = COUNT_TABLES[ca][0]
    out.setflags(write=False)
    return out


def bucket_probs(pairs: list[int], k: list[int], ga: int, ca: int) -> np.ndarray:
    """One probability row per bucket symbol: row j's gap table k_j times (all rows), then its
    count table k_j - 1 times: [Σk + Σ(k - 1), max(ga, ca, 2)] float64."""
    tables = np.array([p // NUM_COUNT_TABLES for p in pairs]
                      + [NUM_GAP_TABLES + p % NUM_COUNT_TABLES for p in pairs])
    # NOTE: array.repeat and take: numpy's fast paths (np.repeat of lists, fancy indexing: ~3x slower)
    return bucket_table(ga, ca).take(tables.repeat(np.array(k + [n - 1 for n in k])), axis=0)


@functools.cache
def head_sizes(kw: int, gamma: int) -> np.ndarray:
    """Uniform sizes of the payload head: [k_j - 1 for each row (if kw)] + [table pair per row]."""
    sizes = ([1 << kw] * gamma if kw else []) + [NUM_TABLE_PAIRS] * gamma
    out = np.array(sizes, dtype=np.int32)
    out.setflags(write=False)
    return out


_SPLIT = np.int64(1 << MANTISSA_SPLIT)


def narrow_fields(ga: int, ca: int) -> bool:
    """Whether buckets under alphabets (ga, ca) have bit lengths <= MANTISSA_SPLIT + 1: values
    < 2**17, mantissas of at most 16 bits (a decoded bucket is always < its alphabet size)."""
    return max(ga, ca) <= MANTISSA_SPLIT + 1


def split_mantissas(values: np.ndarray, bits: np.ndarray, narrow: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mantissas of values with bit lengths ``bits`` -> (symbols, Uniform sizes) int32, fields of
    at most MANTISSA_SPLIT bits. ``narrow``: every bit length is <= 17 (no field is split).

    A value of bit length n >= 2 has the mantissa v - 2**(n-1), n - 1 bits wide. Every mantissa
    gives its low min(n - 1, 16) bits; those wider than 16 then give their high bits after all the
    low parts.
    """
    has = bits > 1
    if narrow:  # int32 throughout: every value < 2**17
        top = ((1 << bits) >> 1)[has]  # 2**(n - 1)
        return (values[has] - top).astype(np.int32), top
    top = np.left_shift(np.int64(1), bits[has] - 1)
    mant = values[has] - top
    big = top > _SPLIT
    lo_size = np.minimum(top, _SPLIT)
    syms = np.concatenate([mant & (lo_size - 1), mant[big] >> MANTISSA_SPLIT])
    return syms.astype(np.int32), np.concatenate([lo_size, top[big] >> MANTISSA_SPLIT]).astype(np.int32)


def join_mantissas(bits: np.ndarray, read: Callable[[np.ndarray], np.ndarray],
                   narrow: bool) -> np.ndarray:
    """Inverse of ``split_mantissas``: bit lengths [N] int32 (<= 33) and a reader of Uniform
    symbols (sizes int32 -> symbols int32) -> values [N] (bit length 0: the value 0; 1: the value
    1). ``narrow``: every bit length is <= 17 (the caller knows from the alphabet sizes), so no
    field is split and int32 holds every value; else int64."""
    if narrow:
        values = (1 << bits) >> 1  # 2**(n - 1); 0 for n = 0
        has = bits > 1
        top = values[has]
        values[has] = top + read(top)
        return values
    values = (np.int64(1) << bits) >> 1
    has = bits > 1
    top = values[has]
    big = top > _SPLIT
    mant = read(np.minimum(top, _SPLIT).astype(np.int32)).astype(np.int64)
    mant[big] |= read((top[big] >> MANTISSA_SPLIT).astype(np.int32)).astype(np.int64) << MANTISSA_SPLIT
    values[has] = top + mant
    return values


class Encoder:
    """Collects sections in *decode* order; ``to_bytes`` pushes them onto an ANS stack reversed.
    Symbols and Uniform sizes are int32 arrays (what constriction takes)."""

    def __init__(self) -> None:
        self._sections: list[tuple[np.ndarray, Any, np.ndarray]] = []

    def uniform(self, symbols: np.ndarray, sizes: np.ndarray) -> None:
        """symbols [N] int32 < sizes [N] int32 (each >= 2)."""
        if symbols.size:
            self._sections.append((symbols, UNIFORM, sizes))

    def categorical(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        """symbols [N] int32, probs [N, A] float64 (one distribution per symbol)."""
        if symbols.size:
            self._sections.append((symbols, CATEGORICAL, probs))

    def to_bytes(self) -> bytes:
        coder = _AnsCoder()
        for symbols, model, params in reversed(self._sections):
            coder.encode_reverse(symbols, model, params)
        return coder.get_compressed().astype("<u4", copy=False).tobytes()


_WORDS = np.dtype("<u4")  # the payload's 32-bit words
_LITTLE_ENDIAN = sys.byteorder == "little"  # constriction takes native uint32


class Decoder:
    """Pops sections in order; any failure inside the coder is ``ProtocolError(BAD_BITSTREAM)``."""

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise ProtocolError(Reason.BAD_BITSTREAM, f"{len(data)} bytes is not whole 32-bit words")
        words = np.frombuffer(data, dtype=_WORDS)
        try:
            self._coder = _AnsCoder(words if _LITTLE_ENDIAN else words.astype(np.uint32))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # NOTE: a Rust panic is pyo3's PanicException (BaseException)
            raise _bitstream_error(e) from e

    def uniform(self, sizes: np.ndarray) -> np.ndarray:
        """sizes [N] int32 (each >= 2) -> symbols [N] int32."""
        if sizes.size == 0:
            return np.zeros(0, dtype=np.int32)
        try:
            return self._coder.decode(UNIFORM, sizes)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise _bitstream_error(e) from e

    def categorical(self, probs: np.ndarray) -> np.ndarray:
        """probs [N, A] float64 -> symbols [N] int32 (< A)."""
        if probs.shape[0] == 0:
            return np.zeros(0, dtype=np.int32)
        try:
            return self._coder.decode(CATEGORICAL, probs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise _bitstream_error(e) from e

    def finish(self) -> None:
        """Nothing may follow the last section (every valid payload is exactly what it encodes)."""
        if not self._coder.is_empty():
            raise ProtocolError(Reason.BAD_BITSTREAM, "data left over after the payload")


def _bitstream_error(e: BaseException) -> ProtocolError:
    return ProtocolError(Reason.BAD_BITSTREAM, f"entropy decoder: {type(e).__name__}: {e}")
