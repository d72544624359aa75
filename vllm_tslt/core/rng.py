"""Deterministic per-(request seed, absolute position) randomness for the draft side.

DESIGN.md exactness rule 6: a seeded request must stay reproducible, so the device derives the
random numbers for the draft at absolute position t from (seed, t) only, never from how many drafts
were made before or which were rejected. A counter-based generator does that without state:
u = splitmix64(seed, t, stream) / 2**64, vectorised over positions and streams, identical on every
platform (numpy uint64 arithmetic wraps modulo 2**64 by definition).

Streams: column 0 draws the spine draft token, columns 1.. the multi-candidate alternatives, so the
spine does not change when the number of candidates does.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al.), elementwise on uint64."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


def _hash_keys(seed: int, positions: np.ndarray, streams: np.ndarray) -> np.ndarray:
    """[n] positions x [m] streams -> [n, m] uint64 hashes of (seed, position, stream)."""
    s = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))  # [1]
    p = _splitmix64(s ^ positions.astype(np.uint64))  # [n]
    return _splitmix64(p[:, None] ^ streams.astype(np.uint64)[None, :])  # [n, m]


def position_uniforms(seed: int, positions: torch.Tensor | list[int], num_streams: int = 1) -> torch.Tensor:
    """Uniforms in [0, 1) for absolute ``positions`` [n] -> [n, num_streams] float64.

    Each value has 53 random bits (a multiple of 2**-53), so sampling with integer thresholds at
    up to 2**16 (``sample_from_sparse``) is exact.
    """
    pos = np.asarray(positions.tolist() if isinstance(positions, torch.Tensor) else positions)
    if pos.ndim != 1 or (pos.size and pos.min() < 0):
        raise ValueError("positions must be a 1-D sequence of non-negative ints")
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    bits = _hash_keys(int(seed), pos.astype(np.int64), np.arange(num_streams)) >> np.uint64(11)
    return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)


def position_uniforms_many(seeds: list[int], positions: list[int], num_streams: int = 1
                           ) -> torch.Tensor:
    """``position_uniforms(seeds[i], [positions[i]], num_streams)[0]`` for every i, in one call:
    [n, num_streams] float64, bit-identical to the one-row calls (same elementwise uint64 ops)."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.ndim != 1 or len(seeds) != pos.size or (pos.size and pos.min() < 0):
        raise ValueError("positions must be non-negative ints, one per seed")
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    s = _splitmix64(np.array([int(x) & _MASK64 for x in seeds], dtype=np.uint64))  # [n]
    p = _splitmix64(s ^ pos.astype(np.uint64))  # [n]
    h = _splitmix64(p[:, None] ^ np.arange(num_streams, dtype=np.uint64)[None, :])  # [n, m]
    return torch.from_numpy((h >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed derived from (seed, position), for torch.Generator.manual_seed."""
    h = _hash_keys(int(seed), np.array([position], dtype=np.int64), np.array([0]))
    return int(h[0, 0]) >> 1


def position_generator(seed: int, position: int) -> torch.Generator:
    """A CPU torch.Generator determined by (seed, absolute position) alone."""
    g = torch.Generator()
    g.manual_seed(position_seed(seed, position))
    return g


def exponential_noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Exp(1) noise for the exponential race argmax(p / E) (a sample from p), float32, E > 0."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator)
    # NOTE: -log1p(-u) with u in [0, 1) is in [0, inf); clamp away exact zeros so p / E is finite.
    return (-torch.log1p(-u)).clamp_min(1e-30).to(torch.float32)
