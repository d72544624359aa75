"""Typed messages between the device (draft agent) and the edge (draft hub). No I/O here.

Request handles: at RequestStart the edge gives each request a small integer ``handle``, unique
within the device's session (1, 2, 3, ...; never reused in a session). Every later message about
the request (Commit, Draft, Pause, End) names it by that handle instead of vLLM's request-id string
(~48 characters, which cost ~12 bytes per draft token). Handle 0 names no request (End(0, ...) is
the device's goodbye).

Sequence conventions (shared by Commit and Draft): a request's *sequence* is its prompt ids followed
by its committed output ids. ``committed_len`` counts tokens of that whole sequence, and
``prefix_hash`` is ``prefix_hash(sequence[:committed_len])``. The edge applies a draft only when both
match its own committed sequence. NOTE: that check is about usefulness, not exactness: a draft token
sampled from the q̃ it carries verifies losslessly against any context (DESIGN.md rule 4); a stale
draft merely gets rejected more. So a 32-bit hash is enough.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Union

import numpy as np
import torch

from vllm_tslt.core.float_q import FloatQ
from vllm_tslt.core.sparsify import SparseQ

# 2: entropy-coded draft payload, per-session request handles; 3: Commit.verified (a device can
# tell a step decoded without its draft from a rejection at the first draft token)
PROTOCOL_VERSION = 3


class MsgType(IntEnum):
    HANDSHAKE = 1
    REQUEST_START = 2
    COMMIT = 3
    DRAFT = 4
    END = 5
    ERROR = 6
    STATUS = 7
    PAUSE = 8
    # Baseline draft formats (vllm_tslt.protocol.baselines); the hub takes them only when its
    # `wire_formats` option lists them.
    DSD_DRAFT = 16
    TKSLT_DRAFT = 17


@dataclass(frozen=True)
class Handshake:
    """Sent by each side first. Both must agree on protocol_version, vocab_size and fingerprint."""

    protocol_version: int
    vocab_size: int
    vocab_fingerprint: str  # vllm_tslt.protocol.fingerprint.vocab_fingerprint(...)
    model_name: str
    capabilities: tuple[str, ...] = ()  # e.g. ("multi_candidate",)
    limits: dict[str, int] = field(default_factory=dict)  # e.g. {"max_k": 64, "max_gamma": 8}
    # Set by the edge in its reply: the session the device's app requests name in
    # `vllm_xargs.tslt_session`. Empty in the device's handshake.
    session_id: str = ""


NO_HANDLE = 0  # End(NO_HANDLE, ...): about the whole session, not one request


@dataclass(frozen=True)
class RequestStart:
    """Edge -> device: a new request to draft for, and the handle later messages name it by."""

    handle: int  # >= 1, unique within the session
    request_id: str  # vLLM's request id, for logs only
    session_id: str
    prompt_ids: tuple[int, ...]
    sampling_params: dict[str, Any] = field(default_factory=dict)  # scalars / lists of scalars


@dataclass(frozen=True)
class Commit:
    """Edge -> device: the sequence is now ``committed_len`` long; ``new_tokens`` were appended.

    ``verified``: draft tokens the edge verified in the step that emitted ``new_tokens`` (0: it
    decoded that step without a draft of this device: late, paused, or declined by the intake
    policy). A paused device's commits are sent together (docs/protocol.md): then ``new_tokens``
    spans several plain steps and ``verified`` is 0. Without it a plain step whose token differs from the draft's first token looks like a
    rejection at position 0, and the device's acceptance estimate sinks.
    """

    handle: int
    committed_len: int
    new_tokens: tuple[int, ...]
    verified: int = 0


@dataclass(frozen=True)
class Draft:
    """Device -> edge: γ draft tokens, each sampled from the q̃ row sent with it.

    ``alternatives`` ([γ, m - 1] int64, draw order) are the multi-candidate extras drawn i.i.d. from
    the same q̃ rows as ``tokens`` (the spine). Every token and alternative lies in its row's support.
    """

    handle: int
    committed_len: int  # length of the sequence the draft was conditioned on
    prefix_hash: int  # prefix_hash(sequence[:committed_len]), uint32
    tokens: torch.Tensor  # [γ] int64
    q: SparseQ | FloatQ  # γ rows (FloatQ: a baseline wire format)
    alternatives: torch.Tensor | None = None  # [γ, m - 1] int64

    @property
    def gamma(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_candidates(self) -> int:
        return 1 if self.alternatives is None else 1 + int(self.alternatives.shape[1])

    def candidates(self) -> torch.Tensor:
        """[γ, m] int64: column 0 the spine, then the alternatives in draw order."""
        if self.alternatives is None:
            return self.tokens.view(-1, 1)
        return torch.cat([self.tokens.view(-1, 1), self.alternatives], dim=1)


@dataclass(frozen=True)
class Pause:
    """Device -> edge: no drafts for this request until the next Draft; do not wait for them.

    Sent when the device's adaptive γ switches speculation off, so the edge decodes the request
    alone without spending its draft deadline on every step."""

    handle: int


@dataclass(frozen=True)
class EdgeStatus:
    """Edge -> device, a few times a second: what the edge's steps cost now, so the device's
    adaptive γ and switch-off account for the server's load (docs/protocol.md).

    ``step_ms``: a decode step of the running batch without drafts; ``draft_token_ms``: what each
    scheduled draft token adds to a step (the verification cost per token); ``running``: requests
    in the batch. Both times are the edge's running estimates (least squares over recent steps).
    """

    step_ms: float
    draft_token_ms: float
    running: int


@dataclass(frozen=True)
class End:
    """Either direction: the request is over (finished, aborted, ...); free its state.
    ``End(NO_HANDLE, "bye")`` from a device: it is leaving, free its whole session."""

    handle: int
    reason: str


@dataclass(frozen=True)
class Error:
    """Either direction: something went wrong; ``code`` is machine-readable (e.g. a Reason value).

    NOTE: its frame layout ``[version, ERROR, code, message, request_id]`` is the same in every
    protocol version, so a refusal sent under the peer's own version number (codec.refusal_frame)
    can be read by a peer that speaks another version."""

    code: str
    message: str
    request_id: str = ""


Message = Union[Handshake, RequestStart, Commit, Draft, End, Error, EdgeStatus, Pause]  # noqa: UP007


class PrefixHasher:
    """Incremental ``prefix_hash``: the edge updates it with each commit instead of rehashing."""

    def __init__(self, token_ids: Iterable[int] = ()) -> None:
        self._h = hashlib.blake2b(digest_size=4, person=b"tslt-pfx")
        self.length = 0
        self.update(token_ids)

    def update(self, token_ids: Iterable[int] | torch.Tensor) -> None:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        ids = np.asarray(list(token_ids), dtype="<u4")
        self._h.update(ids.tobytes())
        self.length += ids.size

    def value(self) -> int:
        return int.from_bytes(self._h.digest(), "little")


def prefix_hash(token_ids: Iterable[int] | torch.Tensor) -> int:
    """32-bit blake2b of the token ids as little-endian uint32."""
    return PrefixHasher(token_ids).value()
