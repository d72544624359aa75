"""Sans-IO wire codec: ``encode(msg) -> bytes`` and ``decode(bytes, limits) -> msg``. Never pickle.

Frame: one msgpack array ``[version, type, *fields]``; token-id arrays are raw little-endian uint32
``bin`` buffers. A draft's sparse rows travel as one entropy-coded payload (ANS, `constriction`):
supports as index gaps and q̃ as integer counts, each an entropy-coded bucket (bit length) under a
per-row table plus raw mantissa bits, and the draft tokens and alternatives as columns of their
rows coded with q̃ itself (layout: sparse_payload.py; models: entropy.py).

Sending each draft token as a column of its own support makes "drafted token in S" structural, and
ascending order is structural too (gaps >= 0). ``decode`` still checks everything that can be wrong:
version, type, field types, sizes against ``DecodeLimits``, index range, counts, leftover data.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from vllm_tslt.core.float_q import FloatQ
from vllm_tslt.protocol.baselines import FLOAT_DRAFT_TYPES, decode_float_draft, encode_float_draft
from vllm_tslt.protocol.errors import (
    ProtocolError,
    Reason,
    expect_fields,
    get_bin,
    get_float,
    get_int,
    get_str,
    is_int,
)
from vllm_tslt.protocol.frame import (
    MAX_SEQ_LEN,
    MAX_U32,
    DecodeLimits,
    bin_to_ids,
    ids_to_bin,
    pack_frame,
    unpack_frame,
)
from vllm_tslt.protocol.messages import (
    PROTOCOL_VERSION,
    Commit,
    Draft,
    EdgeStatus,
    End,
    Error,
    Handshake,
    Message,
    MsgType,
    Pause,
    RequestStart,
)
from vllm_tslt.protocol.sparse_payload import decode_sparse_rows, encode_sparse_rows

# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Bytes of one frame. Raises ValueError for a message we would refuse to decode ourselves."""
    if isinstance(msg, Draft):
        if isinstance(msg.q, FloatQ):
            return encode_float_draft(msg)
        payload, header = encode_sparse_rows(msg.q, msg.tokens, msg.alternatives)
        fields = [_handle(msg.handle), msg.committed_len, msg.prefix_hash, *header, payload]
        return pack_frame(MsgType.DRAFT, fields)
    if isinstance(msg, Commit):
        if not is_int(msg.verified) or not 0 <= msg.verified <= MAX_SEQ_LEN:
            raise ValueError(f"Commit.verified must be an int in [0, {MAX_SEQ_LEN}], got "
                             f"{msg.verified!r}")
        return pack_frame(MsgType.COMMIT, [_handle(msg.handle), msg.committed_len,
                                           ids_to_bin(msg.new_tokens), msg.verified])
    if isinstance(msg, RequestStart):
        _check_params(msg.sampling_params, ValueError)
        fields = [_handle(msg.handle), msg.request_id, msg.session_id, ids_to_bin(msg.prompt_ids),
                  dict(msg.sampling_params)]
        return pack_frame(MsgType.REQUEST_START, fields)
    if isinstance(msg, Handshake):
        if msg.protocol_version != PROTOCOL_VERSION:
            raise ValueError(f"this codec speaks protocol {PROTOCOL_VERSION}, not {msg.protocol_version}")
        fields = [msg.vocab_size, msg.vocab_fingerprint, msg.model_name, list(msg.capabilities),
                  dict(msg.limits), msg.session_id]
        return pack_frame(MsgType.HANDSHAKE, fields)
    if isinstance(msg, End):
        return pack_frame(MsgType.END, [_handle(msg.handle, 0), msg.reason])
    if isinstance(msg, Error):
        return pack_frame(MsgType.ERROR, [msg.code, msg.message, msg.request_id])
    if isinstance(msg, Pause):
        return pack_frame(MsgType.PAUSE, [_handle(msg.handle)])
    if isinstance(msg, EdgeStatus):
        return pack_frame(MsgType.STATUS, [float(msg.step_ms), float(msg.draft_token_ms), msg.running])
    raise TypeError(f"not a protocol message: {type(msg).__name__}")


def decode(data: bytes, limits: DecodeLimits) -> Message:
    """Parse and validate one frame from an untrusted peer. Raises ProtocolError(reason=...)."""
    msg_type, f = unpack_frame(data, limits)
    if msg_type == MsgType.DRAFT:
        expect_fields(f, 10, "draft")
        q, tokens, alternatives = decode_sparse_rows(f[3:10], limits)
        return Draft(get_int(f[0], "handle", 1, MAX_U32), get_int(f[1], "committed_len", 0, MAX_SEQ_LEN),
                     get_int(f[2], "prefix_hash", 0, MAX_U32), tokens, q, alternatives)
    if msg_type == MsgType.COMMIT:
        expect_fields(f, 4, "commit")
        new = bin_to_ids(get_bin(f[2], "new_tokens"), "new_tokens", limits.vocab_size, limits.max_prompt_len)
        committed = get_int(f[1], "committed_len", new.size, MAX_SEQ_LEN)
        return Commit(get_int(f[0], "handle", 1, MAX_U32), committed, tuple(new.tolist()),
                      get_int(f[3], "verified", 0, MAX_SEQ_LEN))
    if msg_type == MsgType.REQUEST_START:
        expect_fields(f, 5, "request_start")
        prompt = bin_to_ids(get_bin(f[3], "prompt_ids"), "prompt_ids", limits.vocab_size, limits.max_prompt_len)
        params = _check_params(f[4], lambda detail: ProtocolError(Reason.MALFORMED, detail))
        return RequestStart(get_int(f[0], "handle", 1, MAX_U32), get_str(f[1], "request_id"),
                            get_str(f[2], "session_id"), tuple(prompt.tolist()), params)
    if msg_type == MsgType.HANDSHAKE:
        return _decode_handshake(f)
    if msg_type == MsgType.END:
        expect_fields(f, 2, "end")
        return End(get_int(f[0], "handle", 0, MAX_U32), get_str(f[1], "reason"))
    if msg_type == MsgType.ERROR:
        expect_fields(f, 3, "error")
        return Error(get_str(f[0], "code"), get_str(f[1], "message"), get_str(f[2], "request_id"))
    if msg_type == MsgType.STATUS:
        expect_fields(f, 3, "status")
        return EdgeStatus(get_float(f[0], "step_ms", 0.0, MAX_STATUS_MS),
                          get_float(f[1], "draft_token_ms", 0.0, MAX_STATUS_MS),
                          get_int(f[2], "running", 0, MAX_U32))
    if msg_type == MsgType.PAUSE:
        expect_fields(f, 1, "pause")
        return Pause(get_int(f[0], "handle", 1, MAX_U32))
    if msg_type in FLOAT_DRAFT_TYPES:
        return decode_float_draft(msg_type, f, limits)
    raise ProtocolError(Reason.BAD_TYPE, f"message type {msg_type}")


def _decode_handshake(f: list[Any]) -> Handshake:
    expect_fields(f, 6, "handshake")
    caps, limits = f[3], f[4]
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ProtocolError(Reason.MALFORMED, "capabilities must be a list of str")
    if not isinstance(limits, dict) or not all(is_int(v) for v in limits.values()):
        raise ProtocolError(Reason.MALFORMED, "limits must map str to int")
    return Handshake(PROTOCOL_VERSION, get_int(f[0], "vocab_size", 1, MAX_U32), get_str(f[1], "fingerprint"),
                     get_str(f[2], "model_name"), tuple(caps), dict(limits),
                     get_str(f[5], "session_id"))


def _handle(handle: int, lowest: int = 1) -> int:
    if not isinstance(handle, int) or isinstance(handle, bool) or not lowest <= handle <= MAX_U32:
        raise ValueError(f"a request handle must be an int in [{lowest}, 2**32), got {handle!r}")
    return handle


def refusal_frame(peer_frame: bytes, code: str, message: str) -> bytes:
    """An Error frame numbered with the version the peer's frame claims (ours if it claims none):
    Error's layout is the same in every version, so a peer that speaks another protocol version
    can read why it was refused instead of dropping an undecodable reply."""
    version = PROTOCOL_VERSION
    try:
        head = msgpack.Unpacker(max_buffer_size=len(peer_frame) + 1)
        head.feed(peer_frame)
        if head.read_array_header() >= 1 and is_int(v := head.unpack()) and 0 <= v < 1 << 16:
            version = v
    except Exception:  # not even a msgpack array: answer in our own version
        pass
    return msgpack.packb([version, int(MsgType.ERROR), code, message, ""], use_bin_type=True)


MAX_STATUS_MS = 1e6  # an edge status time beyond this (17 minutes) is a lie

_SCALARS = (type(None), bool, int, float, str)


def _check_params(params: Any, error: Any) -> dict[str, Any]:
    """Sampling params: str keys; values scalars or flat lists of scalars; floats finite."""
    if not isinstance(params, dict):
        raise error("sampling_params must be a map")
    for key, value in params.items():
        items = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not all(isinstance(v, _SCALARS) for v in items):
            raise error(f"sampling_params[{key!r}] must be a scalar or a flat list of scalars")
        if any(isinstance(v, float) and not np.isfinite(v) for v in items):
            if error is ValueError:
                raise error(f"sampling_params[{key!r}] is not finite")
            raise ProtocolError(Reason.NON_FINITE, f"sampling_params[{key!r}]")
    return dict(params)


__all__ = ["DecodeLimits", "bin_to_ids", "decode", "encode", "ids_to_bin", "pack_frame",
           "refusal_frame", "unpack_frame"]
