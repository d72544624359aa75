"""The one error the wire codec raises: ``ProtocolError`` with a machine-readable ``reason``."""

from __future__ import annotations

from enum import Enum
from typing import Any


class Reason(str, Enum):
    """Why a frame was refused. The edge counts these; the value is what gets logged."""

    MALFORMED = "malformed"  # not a msgpack frame of the expected shape / field types
    BAD_VERSION = "bad_version"  # protocol version we do not speak
    BAD_TYPE = "bad_type"  # unknown message type
    TOO_LARGE = "too_large"  # payload, string or array beyond the configured limits
    OUT_OF_RANGE = "out_of_range"  # ids >= vocab_size, negative lengths, bad quant_bits, ...
    BAD_INDICES = "bad_indices"  # support indices not strictly ascending / out of range
    BAD_COUNTS = "bad_counts"  # a count < 1 or counts not summing to 2**quant_bits
    NOT_IN_SUPPORT = "not_in_support"  # a drafted token or alternative outside q̃'s support
    NON_FINITE = "non_finite"  # NaN or inf where a float appears
    BAD_BITSTREAM = "bad_bitstream"  # packed payload shorter/longer than its header says


class ProtocolError(ValueError):
    """A frame that must not be used. ``reason`` is a ``Reason``; ``detail`` is for humans."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)


# Field checks for decoders: wrong type -> MALFORMED, wrong value -> OUT_OF_RANGE.


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def get_int(x: Any, what: str, lo: int, hi: int) -> int:
    if not is_int(x):
        raise ProtocolError(Reason.MALFORMED, f"{what} must be an int, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ProtocolError(Reason.OUT_OF_RANGE, f"{what}={x} not in [{lo}, {hi}]")
    return x


def get_float(x: Any, what: str, lo: float, hi: float) -> float:
    """A msgpack float (ints accepted); NaN/inf -> NON_FINITE, outside [lo, hi] -> OUT_OF_RANGE."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        raise ProtocolError(Reason.MALFORMED, f"{what} must be a number, got {type(x).__name__}")
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        raise ProtocolError(Reason.NON_FINITE, what)
    if not lo <= x <= hi:
        raise ProtocolError(Reason.OUT_OF_RANGE, f"{what}={x} not in [{lo}, {hi}]")
    return x


def get_str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise ProtocolError(Reason.MALFORMED, f"{what} must be a str, got {type(x).__name__}")
    return x


def get_bin(x: Any, what: str) -> bytes:
    if not isinstance(x, bytes):
        raise ProtocolError(Reason.MALFORMED, f"{what} must be bin, got {type(x).__name__}")
    return x


def expect_fields(fields: list[Any], n: int, what: str) -> None:
    if len(fields) != n:
        raise ProtocolError(Reason.MALFORMED, f"{what} has {len(fields)} fields, expected {n}")
