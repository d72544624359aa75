"""Vectorised MSB-first bit packing (numpy) for the sparse-draft payload.

A bitstream is a sequence of sections; each section is either fixed-width fields (value v in w bits,
w <= 32, w may be 0) or unary codes (h encoded as h zero bits then a one). Unary codes go last in a
stream so a reader can find their ends with one ``flatnonzero``.
"""

from __future__ import annotations

import numpy as np

from vllm_tslt.protocol.errors import ProtocolError, Reason

MAX_FIELD_BITS = 32


class BitWriter:
    """Collects sections, then ``to_bytes`` packs them (zero-padded to a whole byte)."""

    def __init__(self) -> None:
        self._sections: list[tuple[str, np.ndarray, np.ndarray]] = []

    def fixed(self, values: np.ndarray, widths: np.ndarray | int) -> None:
        values = np.asarray(values, dtype=np.uint64).ravel()
        widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape).ravel()
        if values.size and (widths.max() > MAX_FIELD_BITS or (values >> widths.astype(np.uint64)).any()):
            raise ValueError("a value does not fit its field width")
        self._sections.append(("fixed", values, widths))

    def unary(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.int64).ravel()
        self._sections.append(("unary", values, values + 1))

    def to_bytes(self) -> bytes:
        widths = [w for _, _, w in self._sections]
        total = int(sum(int(w.sum()) for w in widths))
        bits = np.zeros(total, dtype=np.uint8)
        pos = 0
        for kind, values, w in self._sections:
            ends = pos + np.cumsum(w)
            if kind == "unary":
                bits[ends - 1] = 1
            elif values.size:
                starts = ends - w
                t = np.arange(int(w.max()))  # [W]
                mask = t[None, :] < w[:, None]  # [N, W]
                shift = np.where(mask, w[:, None] - 1 - t[None, :], 0).astype(np.uint64)
                bit = ((values[:, None] >> shift) & np.uint64(1)).astype(np.uint8)
                idx = starts[:, None] + t[None, :]
                bits[idx[mask]] = bit[mask]
            pos = int(ends[-1]) if w.size else pos
        return np.packbits(bits).tobytes()


class BitReader:
    """Reads sections back in order; every overrun raises ProtocolError(BAD_BITSTREAM)."""

    def __init__(self, data: bytes) -> None:
        self._bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self.pos = 0

    def fixed(self, widths: np.ndarray | int, count: int | None = None) -> np.ndarray:
        """Values of ``count`` fields of the given widths (scalar widths need ``count``)."""
        w = np.asarray(widths, dtype=np.int64)
        w = np.full(count, int(w), dtype=np.int64) if w.ndim == 0 else w.ravel()
        if w.size == 0:
            return np.zeros(0, dtype=np.uint64)
        if not w.any():  # all fields zero bits wide: zeros, and no bits consumed
            return np.zeros(w.size, dtype=np.uint64)
        ends = self.pos + np.cumsum(w)
        if int(ends[-1]) > self._bits.size:
            raise ProtocolError(Reason.BAD_BITSTREAM, "payload ends inside a fixed-width field")
        starts = ends - w
        t = np.arange(max(int(w.max()), 1))
        mask = t[None, :] < w[:, None]
        idx = np.where(mask, starts[:, None] + t[None, :], 0)
        bit = np.where(mask, self._bits[idx], 0).astype(np.uint64)
        shift = np.where(mask, w[:, None] - 1 - t[None, :], 0).astype(np.uint64)
        self.pos = int(ends[-1])
        return (bit << shift).sum(axis=1, dtype=np.uint64)

    def unary(self, count: int) -> np.ndarray:
        """``count`` unary codes -> int64 values."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        ones = np.flatnonzero(self._bits[self.pos :])[:count]
        if ones.size < count:
            raise ProtocolError(Reason.BAD_BITSTREAM, "payload ends inside a unary code")
        values = np.diff(ones, prepend=-1) - 1
        self.pos += int(ones[-1]) + 1
        return values.astype(np.int64)

    def finish(self) -> None:
        """Only zero padding (< 8 bits) may follow the last section."""
        rest = self._bits[self.pos :]
        if rest.size >= 8 or rest.any():
            raise ProtocolError(Reason.BAD_BITSTREAM, f"{rest.size} trailing bits after the payload")
