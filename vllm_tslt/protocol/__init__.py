"""Device <-> edge wire protocol: typed messages and a sans-IO, versioned, validating codec."""

from vllm_tslt.protocol.codec import DecodeLimits, decode, encode, refusal_frame
from vllm_tslt.protocol.errors import ProtocolError, Reason
from vllm_tslt.protocol.fingerprint import vocab_fingerprint
from vllm_tslt.protocol.messages import (
    NO_HANDLE,
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
    PrefixHasher,
    RequestStart,
    prefix_hash,
)

__all__ = [
    "NO_HANDLE",
    "PROTOCOL_VERSION",
    "Commit",
    "DecodeLimits",
    "Draft",
    "EdgeStatus",
    "End",
    "Error",
    "Handshake",
    "Message",
    "MsgType",
    "Pause",
    "PrefixHasher",
    "ProtocolError",
    "Reason",
    "RequestStart",
    "decode",
    "encode",
    "prefix_hash",
    "refusal_frame",
    "vocab_fingerprint",
]
