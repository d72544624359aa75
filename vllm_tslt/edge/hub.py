"""The draft hub: the edge's device-facing side, as the engine step sees it (no vLLM in here).

Three parts, one module each:

- `sessions.SessionTable`: sessions, request bindings, stored drafts and counters (the state);
- `device_endpoint.DeviceEndpoint`: the ROUTER socket and its I/O thread (handshakes, validation,
  abuse guards, idle expiry; docs/security.md);
- `DraftHub` (here): lifecycle, and the calls the engine thread makes every step —
  `start_request`, `commit`, `end_request`, `in_flight`, `collect`, `broadcast_status`, `count` —
  which never touch the socket.

**Every engine-step call is total.** An exception inside the engine step takes the whole server down
for every user, so none of those calls raises: an internal anomaly (a commit whose length does not
add up, a request bound twice, a message that cannot be encoded, a failing socket, a bug) is
counted under ``anomaly_<what>``, logged, and the request concerned is unbound (its drafts dropped,
its device told ``End(reason="edge_anomaly")``): it decodes plainly from then on, which is always
exact. A failing `collect` returns no drafts for the step.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from vllm_tslt.protocol import Commit, Draft, EdgeStatus, End, RequestStart

from .config import TsltConfig
from .device_endpoint import CAPABILITIES, DeviceEndpoint
from .guard import ABUSE_MAX_STRIKES, PEER_TABLE_SLACK
from .sessions import (
    MAX_DRAFTS_PER_REQUEST,
    MAX_MISSED_DEADLINES,
    CommitLengthError,
    SessionTable,
)

__all__ = ["ABUSE_MAX_STRIKES", "CAPABILITIES", "MAX_DRAFTS_PER_REQUEST", "MAX_MISSED_DEADLINES",
           "PEER_TABLE_SLACK", "DraftHub"]

logger = logging.getLogger(__name__)

ANOMALY_END_REASON = "edge_anomaly"  # End.reason sent to a device whose request was unbound
_LOGGED_PER_KIND = 5  # anomalies of one kind logged with a traceback; later ones at debug level

R = TypeVar("R")


def _never_raises(fallback: Callable[[], Any], *, per_request: bool = False
                  ) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Make an engine-step method total: an exception becomes the anomaly ``<method>_failed``
    (counted, logged; with per_request, the request named by the first argument is unbound) and
    the call returns ``fallback()``."""

    def wrap(method: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(method)
        def guarded(self: DraftHub, *args: Any, **kwargs: Any) -> R:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                request_id = (args[0] if args else kwargs.get("request_id")) if per_request \
                    else None
                self._anomaly(f"{method.__name__}_failed", request_id, exc)
                return fallback()
        return guarded

    return wrap


class DraftHub:
    """Device sessions, request binding and draft collection for one vLLM worker."""

    def __init__(self, config: TsltConfig, *, vocab_size: int, vocab_fingerprint: str,
                 model_name: str, max_gamma: int) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.vocab_fingerprint = vocab_fingerprint
        self.model_name = model_name
        self.max_gamma = max_gamma
        self.table = SessionTable(config.max_requests_per_session,
                                  forgive_late=config.intake == "adaptive")
        self.io = DeviceEndpoint(config, self.table, vocab_size=vocab_size,
                                 vocab_fingerprint=vocab_fingerprint, model_name=model_name,
                                 max_gamma=max_gamma)
        self.limits = self.io.limits
        self.endpoint = ""
        self._anomalies_logged: Counter[str] = Counter()

    @property
    def counters(self) -> Counter[str]:
        return self.table.counters

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> DraftHub:
        from vllm_tslt.protocol.sparse_payload import start_compiling_codec

        start_compiling_codec()
        self.endpoint = self.io.start()
        logger.info("TSLT draft hub listening on %s (vocab %d, max_gamma %d, %s)", self.endpoint,
                    self.vocab_size, self.max_gamma,
                    "CURVE" if self.config.curve else "no authentication: trusted networks only")
        return self

    def close(self) -> None:
        self.io.close()

    # ------------------------------------------------------------------ engine step

    def has_session(self, session_id: str) -> bool:
        return self.table.has_session(session_id)

    @_never_raises(lambda: False, per_request=True)
    def start_request(self, request_id: str, session_id: str, prompt_ids: Sequence[int],
                      sampling_params: dict[str, Any]) -> bool:
        """Bind a request to a device session and send it the prompt. False: not bound (no such
        session, the session is full, or an anomaly)."""
        if self.table.is_bound(request_id):  # the engine started it before and never ended it
            self._anomaly("start_rebound", request_id)
        bound = self.table.bind(request_id, session_id, prompt_ids)
        if bound is None:
            return False
        identity, handle = bound
        self.io.send(identity, RequestStart(handle, request_id, session_id, tuple(prompt_ids),
                                            sampling_params))
        return True

    @_never_raises(lambda: None, per_request=True)
    def commit(self, request_id: str, committed_len: int, new_tokens: Sequence[int],
               verified: int = 0) -> None:
        """The request's sequence is now committed_len tokens long, ending with new_tokens, emitted
        by a step that verified `verified` draft tokens of the request (0: decoded plainly)."""
        try:
            told = self.table.advance(request_id, committed_len, new_tokens, int(verified))
        except CommitLengthError as exc:
            self._anomaly("commit_length", request_id, exc, traceback=False)
            return
        if told is None:  # unbound, or paused and held back (SessionTable.advance)
            return
        identity, handle, held = told
        new = tuple(new_tokens)
        if held and verified:  # `verified` speaks of this step's tokens only: tell the rest first
            self.io.send(identity, Commit(handle, committed_len - len(new), held, 0))
            held = ()
        self.io.send(identity, Commit(handle, committed_len, (*held, *new), int(verified)))

    @_never_raises(lambda: None, per_request=True)
    def end_request(self, request_id: str, reason: str) -> None:
        bound = self.table.unbind(request_id)
        if bound is not None:
            self.io.send(bound[0], End(bound[1], reason))

    @_never_raises(dict)
    def in_flight(self, request_ids: Iterable[str]) -> dict[str, float | None]:
        """Requests whose draft may still come, with the seconds until it is due
        (`SessionTable.in_flight`; the intake policy's input, edge/intake.py)."""
        return self.table.in_flight(request_ids)

    @_never_raises(dict)
    def collect(self, request_ids: Iterable[str], deadline_s: float,
                wait_for: Iterable[str] | None = None, defer: Iterable[str] = ()
                ) -> dict[str, Draft]:
        """Wait until each request (of `wait_for`, default all) has a draft for its committed
        sequence, or the deadline (`SessionTable.collect`). A deadline that is not a finite
        number waits not at all."""
        if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s)):
            self._anomaly("collect_deadline", None, ValueError(f"deadline_s={deadline_s!r}"),
                          traceback=False)
            deadline_s = 0.0
        return self.table.collect(request_ids, deadline_s, wait_for, defer)

    @_never_raises(lambda: None)
    def broadcast_status(self, status: EdgeStatus) -> None:
        """Tell every session with a running request what the edge's steps cost now."""
        for identity in self.table.identities_with_requests():
            self.io.send(identity, status)

    @_never_raises(lambda: None)
    def count(self, name: str, n: int = 1) -> None:
        self.table.count(name, n)

    @_never_raises(lambda: None)
    def count_many(self, counts: dict[str, int]) -> None:
        self.table.count_many(counts)

    def snapshot(self) -> dict[str, int]:
        return self.table.snapshot()

    # ------------------------------------------------------------------ anomalies

    def _anomaly(self, kind: str, request_id: str | None, exc: BaseException | None = None,
                 traceback: bool = True) -> None:
        """Count and log an anomaly of an engine-step call; unbind request_id (plain decoding).
        Never raises, whatever state the hub is in."""
        try:
            self.table.count(f"anomaly_{kind}")
            self._anomalies_logged[kind] += 1
            if self._anomalies_logged[kind] <= _LOGGED_PER_KIND:
                logger.warning("TSLT draft hub anomaly %s (request %s): %s; the request decodes "
                               "without drafts", kind, request_id, exc,
                               exc_info=exc if traceback else None)
            else:
                logger.debug("TSLT draft hub anomaly %s (request %s): %s", kind, request_id, exc)
            if request_id is not None:
                bound = self.table.unbind(request_id)
                if bound is not None:
                    self.io.send(bound[0], End(bound[1], ANOMALY_END_REASON))
        except Exception:  # the table itself is broken: nothing more we can do for this call
            logger.exception("TSLT draft hub: handling anomaly %s failed", kind)
