"""The draft hub: the edge's device-facing ZeroMQ endpoint (no vLLM in here).

One I/O thread owns the ROUTER socket: it answers handshakes at any time (also while the engine is
idle), validates and stores incoming drafts, and sends what the engine thread queues. The engine
thread talks to it through four calls per step — `start_request`, `commit`, `end_request` and
`collect` — and never touches the socket. Everything untrusted is decoded with limits; anything
wrong is dropped and counted by reason, never raised into the engine.

Security (docs/security.md): with ``curve_secret_key_file`` set the ROUTER is a CURVE server and
ZeroMQ's ZAP handler rejects keys outside ``curve_authorized_keys_dir``; every session is bound to
the CURVE public key that opened it, and a message or draft from another key is refused
(``invalid_wrong_peer``). Each routing id has a token bucket (``max_messages_per_s``) and a strike
count: more than ``ABUSE_MAX_STRIKES`` invalid or over-limit messages within ``ABUSE_WINDOW_S``
close its session (``sessions_closed_abuse``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from vllm_tslt.core.float_q import FloatQ
from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    Commit,
    DecodeLimits,
    Draft,
    EdgeStatus,
    End,
    Error,
    Handshake,
    Pause,
    PrefixHasher,
    ProtocolError,
    RequestStart,
    decode,
    encode,
)

from .config import TsltConfig
from .guard import ABUSE_MAX_STRIKES, ABUSE_WINDOW_S, PEER_TABLE_SLACK, PeerGuards, enable_curve

logger = logging.getLogger(__name__)

CAPABILITIES = ("multi_candidate",)
MAX_DRAFTS_PER_REQUEST = 4  # drafts kept per request (for different assumed prefixes)
SESSION_IDLE_TIMEOUT_S = 300.0  # a session with no traffic and no requests is forgotten
# After this many steps in a row without a usable draft, the engine stops waiting for a session
# (a stalled or vanished device costs at most this many deadlines) until it sends a draft again.
MAX_MISSED_DEADLINES = 3
_POLL_MS = 100


@dataclass
class _Session:
    session_id: str
    identity: bytes
    peer: str = ""  # the CURVE public key (z85) that opened the session; "" without CURVE
    requests: set[str] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    missed: int = 0  # consecutive collect() deadlines this session's requests missed


@dataclass
class _Request:
    session_id: str
    hasher: PrefixHasher
    drafts: dict[int, Draft] = field(default_factory=dict)  # committed_len -> latest draft
    paused: bool = False  # the device said it sends no drafts until its next one (Pause)


class DraftHub:
    """Device sessions, request binding and draft collection for one vLLM worker."""

    def __init__(self, config: TsltConfig, *, vocab_size: int, vocab_fingerprint: str,
                 model_name: str, max_gamma: int) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.vocab_fingerprint = vocab_fingerprint
        self.model_name = model_name
        self.max_gamma = max_gamma
        self.limits = DecodeLimits(
            vocab_size=vocab_size, max_k=config.max_k, max_gamma=max_gamma,
            max_candidates=config.max_candidates, max_payload_bytes=config.max_payload_bytes,
            max_prompt_len=config.max_prompt_len)
        self.counters: Counter[str] = Counter()
        self._sessions: dict[str, _Session] = {}
        self._by_identity: dict[bytes, str] = {}
        self._requests: dict[str, _Request] = {}
        self._guards = PeerGuards(config.max_messages_per_s, config.max_sessions + PEER_TABLE_SLACK)
        self._cond = threading.Condition()
        # CURVE needs its own context: the ZAP handler serves every socket of a context.
        self._ctx = zmq.Context() if config.curve else zmq.Context.instance()
        self._auth: Any = None  # zmq.auth.thread.ThreadAuthenticator when CURVE is on
        self._router: zmq.Socket | None = None
        self._outbox_addr = f"inproc://tslt-hub-{id(self)}"
        self._outbox: zmq.Socket | None = None  # engine thread's PUSH end
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> DraftHub:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 10_000)
        router.setsockopt(zmq.SNDHWM, 10_000)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # unroutable replies are dropped, not raised
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_payload_bytes)
        if self.config.curve:
            self._enable_curve(router)
        bind = self.config.bind
        if bind.startswith("tcp://") and bind.endswith(":0"):
            port = router.bind_to_random_port(bind[: bind.rindex(":")])
            self.endpoint = f"{bind[: bind.rindex(':')]}:{port}"
        else:
            router.bind(bind)
            self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._router = router
        inbox = self._ctx.socket(zmq.PULL)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.bind(self._outbox_addr)
        self._thread = threading.Thread(target=self._io_loop, args=(router, inbox),
                                        name="tslt-draft-hub", daemon=True)
        self._thread.start()
        logger.info("TSLT draft hub listening on %s (vocab %d, max_gamma %d, %s)", self.endpoint,
                    self.vocab_size, self.max_gamma,
                    "CURVE" if self.config.curve else "no authentication: trusted networks only")
        return self

    def _enable_curve(self, router: zmq.Socket) -> None:
        self._auth = enable_curve(self._ctx, router, self.config.curve_secret_key_file,
                                  self.config.curve_authorized_keys_dir)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._outbox is not None:
            self._outbox.close(linger=0)
            self._outbox = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
            if self._thread is None or not self._thread.is_alive():
                self._ctx.term()  # our own context (CURVE); every socket of it is closed now

    # ------------------------------------------------------------------ engine side

    def has_session(self, session_id: str) -> bool:
        with self._cond:
            return session_id in self._sessions

    def start_request(self, request_id: str, session_id: str, prompt_ids: Sequence[int],
                      sampling_params: dict[str, Any]) -> bool:
        """Bind a request to a device session and send it the prompt. False: no such session."""
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None:
                self.counters["requests_unknown_session"] += 1
                return False
            if len(session.requests) >= self.config.max_requests_per_session:
                self.counters["requests_over_session_limit"] += 1
                return False
            session.requests.add(request_id)
            self._requests[request_id] = _Request(session_id, PrefixHasher(prompt_ids))
            identity = session.identity
            self.counters["requests_bound"] += 1
        self._send(identity, RequestStart(request_id, session_id, tuple(prompt_ids),
                                          sampling_params))
        return True

    def commit(self, request_id: str, committed_len: int, new_tokens: Sequence[int]) -> None:
        with self._cond:
            req = self._requests.get(request_id)
            if req is None:
                return
            req.hasher.update(new_tokens)
            if req.hasher.length != committed_len:
                raise ValueError(f"commit for {request_id}: length {committed_len} after "
                                 f"{len(new_tokens)} new tokens, expected {req.hasher.length}")
            req.drafts = {n: d for n, d in req.drafts.items() if n >= committed_len}
            session = self._sessions.get(req.session_id)
        if session is not None:
            self._send(session.identity, Commit(request_id, committed_len, tuple(new_tokens)))

    def end_request(self, request_id: str, reason: str) -> None:
        with self._cond:
            req = self._requests.pop(request_id, None)
            if req is None:
                return
            session = self._sessions.get(req.session_id)
            if session is not None:
                session.requests.discard(request_id)
        if session is not None:
            self._send(session.identity, End(request_id, reason))

    def collect(self, request_ids: Iterable[str], deadline_s: float) -> dict[str, Draft]:
        """Wait until each request has a draft for its committed sequence, or the deadline.

        Drafts that arrive later, or for another prefix, are not used for this step; every request
        without a usable draft is counted under `dropped_<reason>` (missing or stale).
        """
        t0 = time.monotonic()
        end = t0 + max(0.0, deadline_s)
        found: dict[str, Draft] = {}
        with self._cond:
            wanted = {rid: p for rid in request_ids if (p := self._expected_locked(rid))}
            sessions = {rid: self._session_of(rid) for rid in wanted}
            responsive = {rid for rid, s in sessions.items() if s.missed < MAX_MISSED_DEADLINES}
            settled: set[str] = set()  # paused (before or during the wait): nothing will come
            while True:
                for rid, (length, phash) in wanted.items():
                    req = self._requests.get(rid)
                    draft = req.drafts.get(length) if req is not None else None
                    if draft is not None and draft.prefix_hash == phash:
                        found[rid] = draft
                    elif req is not None and req.paused:
                        settled.add(rid)
                now = time.monotonic()
                if responsive <= found.keys() | settled or now >= end:
                    break
                self._cond.wait(timeout=end - now)
            for session in {id(s): s for s in sessions.values()}.values():
                got = any(rid in found or rid in settled for rid in session.requests)
                session.missed = 0 if got else session.missed + 1
            for rid, (length, _) in wanted.items():
                req = self._requests.get(rid)
                if rid in found:
                    self.counters["drafts_used"] += 1
                elif rid in settled:
                    self.counters["skipped_paused"] += 1
                elif req is not None and req.drafts:  # drafts exist, none for this prefix
                    self.counters["dropped_stale"] += 1
                else:
                    self.counters["dropped_missing"] += 1
                if req is not None:
                    req.drafts.pop(length, None)
            self.counters["steps_waited"] += 1 if wanted else 0
            self.counters["wait_us"] += int((time.monotonic() - t0) * 1e6) if wanted else 0
        return found

    def broadcast_status(self, status: EdgeStatus) -> None:
        """Tell every session with a running request what the edge's steps cost now."""
        with self._cond:
            identities = [s.identity for s in self._sessions.values() if s.requests]
        for identity in identities:
            self._send(identity, status)

    def count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self.counters[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            out = dict(self.counters)
            out["sessions_active"] = len(self._sessions)
            out["requests_active"] = len(self._requests)
        return out

    # ------------------------------------------------------------------ internals

    def _session_of(self, request_id: str) -> _Session:
        return self._sessions[self._requests[request_id].session_id]

    def _expected_locked(self, request_id: str) -> tuple[int, int] | None:
        req = self._requests.get(request_id)
        if req is None or req.session_id not in self._sessions:
            return None
        return req.hasher.length, req.hasher.value()

    def _send(self, identity: bytes, msg: Any) -> None:
        data = encode(msg)
        if self._outbox is None:
            self._outbox = self._ctx.socket(zmq.PUSH)
            self._outbox.setsockopt(zmq.LINGER, 0)
            self._outbox.setsockopt(zmq.SNDHWM, 100_000)
            self._outbox.connect(self._outbox_addr)
        try:
            self._outbox.send_multipart([identity, data], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.count("downlink_dropped_full")
            return
        self.count("downlink_bytes", len(data))
        self.count("downlink_messages")

    def _io_loop(self, router: zmq.Socket, inbox: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(inbox, zmq.POLLIN)
        last_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(_POLL_MS))
                if inbox in events:
                    while True:
                        try:
                            router.send_multipart(inbox.recv_multipart(zmq.NOBLOCK), zmq.NOBLOCK)
                        except zmq.Again:
                            break
                if router in events:
                    for _ in range(1000):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_frames_guarded(router, [f.bytes for f in frames],
                                                self._peer_of(frames[-1]))
                if time.monotonic() - last_sweep > 5.0:
                    self._expire_idle_sessions(router)
                    last_sweep = time.monotonic()
        except Exception:  # never let the I/O thread die silently
            logger.exception("TSLT draft hub I/O thread crashed; drafts disabled")
        finally:
            router.close(linger=0)
            inbox.close(linger=0)

    def _peer_of(self, frame: zmq.Frame) -> str:
        """The authenticated CURVE key (z85) of a received frame's sender; "" without CURVE."""
        if not self.config.curve:
            return ""
        try:
            return frame.get("User-Id") or ""
        except zmq.ZMQError:  # no ZAP user id: cannot happen with a CURVE server socket
            return ""

    def _on_frames_guarded(self, router: zmq.Socket, frames: list[bytes], peer: str) -> None:
        try:
            self._on_frames(router, frames, peer)
        except Exception:  # a bug on one message must not disable drafts for every device
            self.count("internal_errors")
            logger.exception("TSLT draft hub failed on a device message; message dropped")

    def _on_frames(self, router: zmq.Socket, frames: list[bytes], peer: str = "") -> None:
        if not frames:
            return
        identity = frames[0]
        self.count("uplink_bytes", sum(len(f) for f in frames[1:]))
        if not self._take_token(identity):
            self.count("dropped_rate_limited")  # no reply: replies must not amplify a flood
            self._strike(router, identity)
            return
        if len(frames) != 2:
            self.count("invalid_framing")
            self._strike(router, identity)
            return
        data = frames[1]
        try:
            msg = decode(data, self.limits)
        except ProtocolError as err:
            self.count(f"invalid_{err.reason.value}")
            logger.debug("invalid message from a device: %s", err)
            if not self._strike(router, identity):
                self._reply(router, identity, Error(err.reason.value, str(err)))
            return
        if isinstance(msg, Handshake):
            self._on_handshake(router, identity, msg, peer)
            return
        session = self._session_for(router, identity, peer)
        if session is None:
            self.count("invalid_unknown_peer")
            self._reply(router, identity, Error("unknown_peer", "handshake first"))
            return
        if isinstance(msg, Draft):
            if not self._on_draft(session, msg):
                self._strike(router, identity)
        elif isinstance(msg, End) and msg.request_id == "":
            self._close_session(session.session_id, "device said goodbye")
        elif isinstance(msg, Pause):
            self._on_pause(session, msg.request_id)
        elif not isinstance(msg, End):
            self.count("invalid_unexpected_type")
            self._strike(router, identity)

    def _session_for(self, router: zmq.Socket, identity: bytes, peer: str) -> _Session | None:
        """The sender's session, if it has one opened by the same authenticated key."""
        with self._cond:
            session_id = self._by_identity.get(identity)
            session = self._sessions.get(session_id) if session_id else None
            if session is not None and session.peer == peer:
                session.last_seen = time.monotonic()
                return session
        if session is not None:  # another key took over this routing id: its downlink too
            self.count("invalid_wrong_peer")
            self._close_session(session.session_id, "routing id reused by another CURVE key")
        return None

    def _take_token(self, identity: bytes) -> bool:
        with self._cond:
            return self._guards.allow(identity)

    def _strike(self, router: zmq.Socket, identity: bytes) -> bool:
        """Count one abusive message; True when the sender is over the limit (send no reply)."""
        with self._cond:
            if not self._guards.strike(identity):
                return False
            session_id = self._by_identity.get(identity)
            if session_id is None:  # no session to close: stay silent until the window ends
                return True
            self._guards.forgive(identity)  # a new session starts with a clean slate
            self.counters["sessions_closed_abuse"] += 1
        self._close_session(session_id, f"more than {ABUSE_MAX_STRIKES} invalid or over-limit "
                                        f"messages within {ABUSE_WINDOW_S:g} s")
        self._reply(router, identity, Error("session_closed", "too many invalid or over-limit "
                                            "messages; handshake again"))
        return True

    def _on_draft(self, session: _Session, draft: Draft) -> bool:
        """Store a draft for its request. False: the draft was abusive (another key's request,
        or a wire format this edge does not take)."""
        with self._cond:
            self.counters["drafts_received"] += 1
            wire = draft.q.wire if isinstance(draft.q, FloatQ) else "tslt"
            if wire not in self.config.wire_formats:
                self.counters["invalid_wire_format"] += 1
                return False
            req = self._requests.get(draft.request_id)
            if req is not None and req.session_id != session.session_id:
                owner = self._sessions.get(req.session_id)
                if owner is not None and owner.peer != session.peer:
                    self.counters["invalid_wrong_peer"] += 1
                    return False
            if req is None or req.session_id != session.session_id:
                self.counters["dropped_unknown_request"] += 1
                return True
            req.paused = False  # drafting again: wait for its drafts from now on
            if draft.committed_len < req.hasher.length:
                self.counters["dropped_late"] += 1
                return True
            req.drafts[draft.committed_len] = draft
            session.missed = 0
            while len(req.drafts) > MAX_DRAFTS_PER_REQUEST:  # never evict the current prefix's
                req.drafts.pop(max(n for n in req.drafts if n != req.hasher.length))
            self._cond.notify_all()
        return True

    def _on_pause(self, session: _Session, request_id: str) -> None:
        with self._cond:
            req = self._requests.get(request_id)
            if req is None or req.session_id != session.session_id:
                self.counters["dropped_unknown_request"] += 1
                return
            req.paused = True
            self.counters["pauses"] += 1
            self._cond.notify_all()

    def _on_handshake(self, router: zmq.Socket, identity: bytes, hello: Handshake,
                      peer: str = "") -> None:
        reason = None
        # NOTE: the tokenizers must be identical; the models' logit widths may differ (checkpoints
        # pad their vocabularies differently, e.g. 151936 vs 152064 in one model family), as long
        # as every id the device can send is one the target has.
        if hello.vocab_fingerprint != self.vocab_fingerprint or hello.vocab_size > self.vocab_size:
            reason = ("vocab_mismatch",
                      f"device vocabulary (size {hello.vocab_size}, fingerprint "
                      f"{hello.vocab_fingerprint[:12]}) does not fit target {self.model_name!r} "
                      f"(size {self.vocab_size}, fingerprint {self.vocab_fingerprint[:12]}): the "
                      "draft model must use the target's tokenizer")
        wire = next((c[5:] for c in hello.capabilities if c.startswith("wire:")), "tslt")
        if reason is None and wire not in self.config.wire_formats:
            reason = ("wire_format", f"this edge takes drafts in {list(self.config.wire_formats)}"
                      f" (speculative_config.wire_formats), not {wire!r}")
        with self._cond:
            old = self._by_identity.get(identity)
            if reason is None and old is None and len(self._sessions) >= self.config.max_sessions:
                reason = ("too_many_sessions", f"the edge serves at most "
                          f"{self.config.max_sessions} devices (speculative_config.max_sessions)")
        if reason is not None:
            self.count(f"handshake_refused_{reason[0]}")
            logger.warning("refused device handshake (%s): %s", reason[0], reason[1])
            self._reply(router, identity, Error(*reason))
            return
        if old is not None:
            self._close_session(old, "device handshook again")
        session = _Session(secrets.token_urlsafe(18), identity, peer)
        with self._cond:
            self._sessions[session.session_id] = session
            self._by_identity[identity] = session.session_id
            self.counters["sessions_opened"] += 1
        limits = {"max_gamma": self.max_gamma, "max_k": self.config.max_k,
                  "max_candidates": self.config.max_candidates,
                  "max_payload_bytes": self.config.max_payload_bytes,
                  "draft_deadline_ms": int(self.config.draft_deadline_ms)}
        logger.info("device session %s... opened (draft model %r)", session.session_id[:6],
                    hello.model_name)
        self._reply(router, identity, Handshake(
            PROTOCOL_VERSION, self.vocab_size, self.vocab_fingerprint, self.model_name,
            CAPABILITIES + tuple(f"wire:{w}" for w in self.config.wire_formats), limits,
            session.session_id))

    def _close_session(self, session_id: str, why: str) -> None:
        with self._cond:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return
            if self._by_identity.get(session.identity) == session_id:
                del self._by_identity[session.identity]
            for rid in session.requests:
                req = self._requests.get(rid)
                if req is not None:
                    req.drafts.clear()
            self.counters["sessions_closed"] += 1
            self._cond.notify_all()
        logger.info("device session %s... closed: %s", session_id[:6], why)

    def _expire_idle_sessions(self, router: zmq.Socket | None = None) -> None:
        now = time.monotonic()
        with self._cond:
            idle = [(s.session_id, s.identity) for s in self._sessions.values()
                    if not s.requests and now - s.last_seen > SESSION_IDLE_TIMEOUT_S]
        for session_id, identity in idle:
            self._close_session(session_id, "idle")
            if router is not None:  # a connected but idle device must learn it, or its next
                # requests carry a session id the edge no longer knows and never get drafts
                self._reply(router, identity, Error("unknown_peer", "session expired after "
                                                    "being idle; handshake again"))

    def _reply(self, router: zmq.Socket, identity: bytes, msg: Any) -> None:
        data = encode(msg)
        try:
            router.send_multipart([identity, data], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.count("downlink_dropped_full")
            return
        self.count("downlink_bytes", len(data))
