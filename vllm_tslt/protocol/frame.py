"""Framing shared by every wire message (codec.py) and the baseline formats (baselines.py).

A frame is one msgpack array ``[version, type, *fields]``; token-id arrays travel as raw
little-endian uint32 ``bin`` buffers. ``unpack_frame`` bounds every size before anything is built.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from vllm_tslt.protocol.errors import ProtocolError, Reason, is_int
from vllm_tslt.protocol.messages import PROTOCOL_VERSION, MsgType

MAX_U32 = (1 << 32) - 1
MAX_SEQ_LEN = 1 << 40


@dataclass(frozen=True)
class DecodeLimits:
    """What a peer may send. ``vocab_size`` bounds every token id; the rest bound sizes."""

    vocab_size: int
    max_k: int = 1024
    max_gamma: int = 32
    max_candidates: int = 8
    max_payload_bytes: int = 1 << 22
    max_prompt_len: int = 1 << 20
    max_str_len: int = 512
    max_params: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_k", "max_gamma", "max_candidates", "max_payload_bytes",
                     "max_prompt_len", "max_str_len", "max_params"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be an int >= 1, got {value!r}")
        if self.vocab_size > MAX_U32:
            raise ValueError(f"DecodeLimits.vocab_size must be <= 2**32 - 1, got {self.vocab_size}")


def pack_frame(msg_type: MsgType, fields: list[Any]) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, int(msg_type), *fields], use_bin_type=True)


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(Reason.MALFORMED, f"msgpack ext type {code} is not allowed")


def unpack_frame(data: bytes, limits: DecodeLimits) -> tuple[int, list[Any]]:
    """Version-checked ``(type, fields)`` of one frame; sizes bounded before anything is built."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_payload_bytes:
        raise ProtocolError(Reason.TOO_LARGE, f"{len(data)} bytes > max_payload_bytes")
    try:
        frame = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_payload_bytes,
            max_array_len=max(limits.max_prompt_len, 64), max_map_len=limits.max_params,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises ValueError, FormatError, StackError, UnicodeError, ...
        raise ProtocolError(Reason.MALFORMED, f"not a msgpack frame: {type(e).__name__}: {e}") from e
    if not isinstance(frame, list) or len(frame) < 2:
        raise ProtocolError(Reason.MALFORMED, "frame is not [version, type, ...]")
    version, msg_type = frame[0], frame[1]
    if not is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(Reason.BAD_VERSION, f"the peer speaks TSLT protocol version {version!r}, "
                            f"this side speaks version {PROTOCOL_VERSION}: upgrade the older side "
                            "(device agent and edge must run the same vllm-tslt protocol)")
    if not is_int(msg_type):
        raise ProtocolError(Reason.BAD_TYPE, f"message type {msg_type!r}")
    return msg_type, frame[2:]


def ids_to_bin(ids: Any) -> bytes:
    """Little-endian uint32 bytes of token ids (a commit's one or few ids: struct, not numpy, is
    the cheap way; every engine step sends one per bound request)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    try:
        return struct.pack(f"<{len(values)}I", *values)
    except struct.error:  # negative, too large, or not an integer
        raise ValueError("token ids must be ints in [0, 2**32)") from None


def bin_to_ids(buf: bytes, what: str, vocab_size: int, max_len: int) -> np.ndarray:
    if len(buf) % 4:
        raise ProtocolError(Reason.MALFORMED, f"{what}: {len(buf)} bytes is not a uint32 array")
    if len(buf) // 4 > max_len:
        raise ProtocolError(Reason.TOO_LARGE, f"{what}: {len(buf) // 4} ids > {max_len}")
    ids = np.frombuffer(buf, dtype="<u4").astype(np.int64)
    if ids.size and ids.max() >= vocab_size:
        raise ProtocolError(Reason.OUT_OF_RANGE, f"{what}: id {int(ids.max())} >= vocab_size")
    return ids
