"""Baseline uplink formats, framed like TSLT drafts so bytes per draft token are comparable.

- DSD (distributed speculative decoding): the dense draft distribution over the whole vocabulary,
  fp32 or fp16, little-endian.
- TK-SLT (arXiv 2509.04576): top-K draft probabilities as fp16 plus their int32 indices.

Frame: ``[version, type, handle, committed_len, prefix_hash, ...]`` exactly like a TSLT Draft,
then the draft tokens (uint32 LE) and the arrays. Decoders validate sizes, ranges and finiteness.
A draft in these formats carries a ``FloatQ`` (vllm_tslt.core.float_q): the edge verifies against
``normalise_rows`` of the transmitted values, the distribution the device sampled from.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_tslt.core.float_q import FloatQ
from vllm_tslt.protocol.errors import (
    ProtocolError,
    Reason,
    expect_fields,
    get_bin,
    get_int,
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
from vllm_tslt.protocol.messages import Draft, MsgType

_DSD_DTYPES = {"fp32": (0, "<f4"), "fp16": (1, "<f2")}
FLOAT_DRAFT_TYPES = (MsgType.DSD_DRAFT, MsgType.TKSLT_DRAFT)


def encode_dsd(
    handle: int, committed_len: int, prefix_hash: int,
    tokens: torch.Tensor,  # [γ] int
    probs: torch.Tensor,  # [γ, vocab_size] float, the full draft distribution per token
    dtype: str = "fp16",
) -> bytes:
    if dtype not in _DSD_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DSD_DTYPES)}, got {dtype!r}")
    code, np_dtype = _DSD_DTYPES[dtype]
    gamma, vocab_size = probs.shape
    values = probs.detach().to("cpu", torch.float32).numpy().astype(np_dtype).tobytes()
    fields = [handle, committed_len, prefix_hash, gamma, vocab_size, code, ids_to_bin(tokens), values]
    return pack_frame(MsgType.DSD_DRAFT, fields)


def decode_dsd(data: bytes, limits: DecodeLimits) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens [γ] int64, probs [γ, vocab_size] float32)."""
    msg_type, f = unpack_frame(data, limits)
    if msg_type != MsgType.DSD_DRAFT:
        raise ProtocolError(Reason.BAD_TYPE, f"expected a DSD draft, got type {msg_type}")
    expect_fields(f, 8, "dsd_draft")
    _check_draft_header(f)
    return _dsd_arrays(f, limits)


def _dsd_arrays(f: list, limits: DecodeLimits) -> tuple[torch.Tensor, torch.Tensor]:
    gamma = get_int(f[3], "gamma", 1, limits.max_gamma)
    vocab_size = get_int(f[4], "vocab_size", limits.vocab_size, limits.vocab_size)
    code = get_int(f[5], "dtype", 0, 1)
    tokens = bin_to_ids(get_bin(f[6], "tokens"), "tokens", vocab_size, gamma)
    np_dtype = "<f4" if code == 0 else "<f2"
    values = _floats(get_bin(f[7], "probs"), np_dtype, gamma * vocab_size).reshape(gamma, vocab_size)
    if tokens.size != gamma:
        raise ProtocolError(Reason.MALFORMED, f"{tokens.size} tokens for gamma={gamma}")
    return torch.from_numpy(tokens), torch.from_numpy(values)


def encode_tkslt(
    handle: int, committed_len: int, prefix_hash: int,
    tokens: torch.Tensor,  # [γ] int
    probs: torch.Tensor,  # [γ, vocab_size] float
    top_k: int,
) -> bytes:
    values, indices = torch.topk(probs.detach().to("cpu", torch.float32), top_k, dim=1)  # [γ, K]
    return encode_tkslt_rows(handle, committed_len, prefix_hash, tokens, values, indices)


def encode_tkslt_rows(handle: int, committed_len: int, prefix_hash: int, tokens: torch.Tensor,
                      values: torch.Tensor, indices: torch.Tensor) -> bytes:
    """TK-SLT frame of given top-K rows: values [γ, K] (sent as fp16), indices [γ, K]."""
    gamma, top_k = values.shape
    fields = [handle, committed_len, prefix_hash, gamma, top_k, ids_to_bin(tokens),
              values.to(torch.float32).numpy().astype("<f2").tobytes(),
              indices.to(torch.int64).numpy().astype("<i4").tobytes()]
    return pack_frame(MsgType.TKSLT_DRAFT, fields)


def decode_tkslt(data: bytes, limits: DecodeLimits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (tokens [γ] int64, values [γ, K] float32, indices [γ, K] int64)."""
    msg_type, f = unpack_frame(data, limits)
    if msg_type != MsgType.TKSLT_DRAFT:
        raise ProtocolError(Reason.BAD_TYPE, f"expected a TK-SLT draft, got type {msg_type}")
    expect_fields(f, 8, "tkslt_draft")
    _check_draft_header(f)
    return _tkslt_arrays(f, limits)


def _tkslt_arrays(f: list, limits: DecodeLimits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gamma = get_int(f[3], "gamma", 1, limits.max_gamma)
    top_k = get_int(f[4], "top_k", 1, min(limits.max_k, limits.vocab_size))
    tokens = bin_to_ids(get_bin(f[5], "tokens"), "tokens", limits.vocab_size, gamma)
    values = _floats(get_bin(f[6], "values"), "<f2", gamma * top_k).reshape(gamma, top_k)
    raw_idx = get_bin(f[7], "indices")
    if len(raw_idx) != 4 * gamma * top_k:
        raise ProtocolError(Reason.MALFORMED, "indices size does not match gamma * top_k")
    indices = np.frombuffer(raw_idx, dtype="<i4").astype(np.int64).reshape(gamma, top_k)
    if indices.min() < 0 or indices.max() >= limits.vocab_size:
        raise ProtocolError(Reason.OUT_OF_RANGE, "an index outside the vocabulary")
    if tokens.size != gamma:
        raise ProtocolError(Reason.MALFORMED, f"{tokens.size} tokens for gamma={gamma}")
    return torch.from_numpy(tokens), torch.from_numpy(values), torch.from_numpy(indices)


def encode_float_draft(draft: Draft) -> bytes:
    """A Draft carrying a FloatQ, in its wire format (no padding: the formats are rectangular)."""
    q = draft.q
    assert isinstance(q, FloatQ)
    if draft.alternatives is not None:
        raise ValueError("baseline wire formats carry no multi-candidate alternatives")
    head = (draft.handle, draft.committed_len, draft.prefix_hash, draft.tokens)
    if q.wire == "tkslt":
        return encode_tkslt_rows(*head, q.values, q.indices)
    return encode_dsd(*head, q.values, dtype=q.wire.removeprefix("dsd-"))


def decode_float_draft(msg_type: int, f: list, limits: DecodeLimits) -> Draft:
    """The fields of a DSD or TK-SLT frame -> Draft with a FloatQ; every draft token must have
    q̂ > 0 (NOT_IN_SUPPORT otherwise) and every row positive mass (BAD_COUNTS)."""
    expect_fields(f, 8, "baseline draft")
    _check_draft_header(f)
    if msg_type == MsgType.DSD_DRAFT:
        tokens, values = _dsd_arrays(f, limits)
        vocab = values.shape[1]
        wire = "dsd-fp32" if f[5] == 0 else "dsd-fp16"
        indices = torch.arange(vocab, dtype=torch.int32).expand(values.shape[0], -1).contiguous()
        q = FloatQ(indices, values, wire)
    else:
        tokens, values, indices = _tkslt_arrays(f, limits)
        indices, order = torch.sort(indices.to(torch.int32), dim=1)
        if bool((indices[:, 1:] == indices[:, :-1]).any()):
            raise ProtocolError(Reason.BAD_INDICES, "a TK-SLT row lists an index twice")
        q = FloatQ(indices, values.gather(1, order), "tkslt")
    if bool((q.values.sum(dim=1) <= 0).any()):
        raise ProtocolError(Reason.BAD_COUNTS, "a row with no probability mass")
    if bool((q.prob_of(tokens.view(-1, 1)) <= 0).any()):
        raise ProtocolError(Reason.NOT_IN_SUPPORT, "a draft token with zero probability")
    return Draft(f[0], f[1], f[2], tokens, q)


def _check_draft_header(f: list) -> None:
    get_int(f[0], "handle", 1, MAX_U32)
    get_int(f[1], "committed_len", 0, MAX_SEQ_LEN)
    get_int(f[2], "prefix_hash", 0, MAX_U32)


def _floats(buf: bytes, np_dtype: str, count: int) -> np.ndarray:
    if len(buf) != count * np.dtype(np_dtype).itemsize:
        raise ProtocolError(Reason.MALFORMED, f"{len(buf)} bytes for {count} values of {np_dtype}")
    values = np.frombuffer(buf, dtype=np_dtype).astype(np.float32)
    if not np.isfinite(values).all():
        raise ProtocolError(Reason.NON_FINITE, "NaN or inf in a probability array")
    if (values < 0).any():
        raise ProtocolError(Reason.OUT_OF_RANGE, "negative probability")
    return values
