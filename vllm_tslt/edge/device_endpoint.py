"""The draft hub's device-facing socket: one ROUTER and the I/O thread that owns it.

The thread answers handshakes at any time (also while the engine is idle), decodes every device
message with limits, stores drafts and pauses in the `SessionTable`, forwards what the engine thread
queued (`send`, through an inproc PUSH/PULL pair, so only this thread touches the ROUTER), and
closes sessions that stay idle. Anything wrong is dropped and counted by reason, never raised.

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
from typing import Any

import zmq

from vllm_tslt.protocol import (
    NO_HANDLE,
    PROTOCOL_VERSION,
    DecodeLimits,
    Draft,
    End,
    Error,
    Handshake,
    Pause,
    ProtocolError,
    Reason,
    decode,
    encode,
    refusal_frame,
)

from .config import TsltConfig
from .guard import ABUSE_MAX_STRIKES, ABUSE_WINDOW_S, PEER_TABLE_SLACK, PeerGuards, enable_curve
from .sessions import Session, SessionTable

logger = logging.getLogger(__name__)

CAPABILITIES = ("multi_candidate",)
_POLL_MS = 100
_SWEEP_S = 5.0  # how often idle sessions are looked for


class DeviceEndpoint:
    """The ROUTER socket, its I/O thread, handshakes and per-peer guards of one draft hub."""

    def __init__(self, config: TsltConfig, table: SessionTable, *, vocab_size: int,
                 vocab_fingerprint: str, model_name: str, max_gamma: int) -> None:
        self.config = config
        self.table = table
        self.vocab_size = vocab_size
        self.vocab_fingerprint = vocab_fingerprint
        self.model_name = model_name
        self.max_gamma = max_gamma
        # More Handshake.limits for devices, e.g. the X-data-parallel-rank of this hub's engine
        # (vllm_tslt.edge.parallel, set by the proposer before start()).
        self.extra_limits: dict[str, int] = {}
        self.limits = DecodeLimits(
            vocab_size=vocab_size, max_k=config.max_k, max_gamma=max_gamma,
            max_candidates=config.max_candidates, max_payload_bytes=config.max_payload_bytes,
            max_prompt_len=config.max_prompt_len)
        self.guards = PeerGuards(config.max_messages_per_s, config.max_sessions + PEER_TABLE_SLACK)
        # CURVE needs its own context: the ZAP handler serves every socket of a context.
        self.ctx = zmq.Context() if config.curve else zmq.Context.instance()
        self._auth: Any = None  # zmq.auth.thread.ThreadAuthenticator when CURVE is on
        self._outbox_addr = f"inproc://tslt-hub-{id(self)}"
        self._outbox: zmq.Socket | None = None  # the engine side's PUSH end
        # NOTE: a ZeroMQ socket must not be used by two threads at once (libzmq aborts the
        # process). vLLM calls the hub from one thread, but tests and embedders may not.
        self._outbox_lock = threading.Lock()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Bind the ROUTER, start the I/O thread. Returns the bound endpoint."""
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 10_000)
        router.setsockopt(zmq.SNDHWM, 10_000)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # unroutable replies are dropped, not raised
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_payload_bytes)
        if self.config.curve:
            self._auth = enable_curve(self.ctx, router, self.config.curve_secret_key_file,
                                      self.config.curve_authorized_keys_dir)
        bind = self.config.bind
        if bind.startswith("tcp://") and bind.endswith(":0"):
            port = router.bind_to_random_port(bind[: bind.rindex(":")])
            endpoint = f"{bind[: bind.rindex(':')]}:{port}"
        else:
            router.bind(bind)
            endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        inbox = self.ctx.socket(zmq.PULL)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.bind(self._outbox_addr)
        self.thread = threading.Thread(target=self._io_loop, args=(router, inbox),
                                       name="tslt-draft-hub", daemon=True)
        self.thread.start()
        return endpoint

    def close(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=2.0)
        with self._outbox_lock:
            if self._outbox is not None:
                self._outbox.close(linger=0)
                self._outbox = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
            if self.thread is None or not self.thread.is_alive():
                self.ctx.term()  # our own context (CURVE); every socket of it is closed now

    # ------------------------------------------------------------------ engine thread

    def send(self, identity: bytes, msg: Any) -> None:
        """Queue a message for a device (from the engine side, any thread; the I/O thread sends
        it)."""
        data = encode(msg)
        with self._outbox_lock:
            if self._outbox is None:
                self._outbox = self.ctx.socket(zmq.PUSH)
                self._outbox.setsockopt(zmq.LINGER, 0)
                self._outbox.setsockopt(zmq.SNDHWM, 100_000)
                self._outbox.connect(self._outbox_addr)
            try:
                self._outbox.send_multipart([identity, data], flags=zmq.NOBLOCK)
            except zmq.Again:
                self.table.count("downlink_dropped_full")
                return
        self.table.count_many({"downlink_bytes": len(data), "downlink_messages": 1})

    # ------------------------------------------------------------------ I/O thread

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
                        self.on_frames_guarded(router, [f.bytes for f in frames],
                                               self._peer_of(frames[-1]))
                if time.monotonic() - last_sweep > _SWEEP_S:
                    self.expire_idle_sessions(router)
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

    def on_frames_guarded(self, router: Any, frames: list[bytes], peer: str) -> None:
        try:
            self.on_frames(router, frames, peer)
        except Exception:  # a bug on one message must not disable drafts for every device
            self.table.count("internal_errors")
            logger.exception("TSLT draft hub failed on a device message; message dropped")

    def on_frames(self, router: Any, frames: list[bytes], peer: str = "") -> None:
        """Handle one message ([routing id, payload]) from a device."""
        if not frames:
            return
        identity = frames[0]
        count = self.table.count
        count("uplink_bytes", sum(len(f) for f in frames[1:]))
        if not self._take_token(identity):
            count("dropped_rate_limited")  # no reply: replies must not amplify a flood
            self._strike(router, identity)
            return
        if len(frames) != 2:
            count("invalid_framing")
            self._strike(router, identity)
            return
        try:
            msg = decode(frames[1], self.limits)
        except ProtocolError as err:
            count(f"invalid_{err.reason.value}")
            logger.debug("invalid message from a device: %s", err)
            if self._strike(router, identity):
                return
            if err.reason == Reason.BAD_VERSION:  # numbered with the peer's own version, so a
                # device that speaks another one can read why it is refused
                self._send_reply(router, identity,
                                 refusal_frame(frames[1], err.reason.value, str(err)))
            else:
                self._reply(router, identity, Error(err.reason.value, str(err)))
            return
        if isinstance(msg, Handshake):
            self._on_handshake(router, identity, msg, peer)
            return
        session = self.table.session_for(identity, peer)
        if session is None:
            count("invalid_unknown_peer")
            self._reply(router, identity, Error("unknown_peer", "handshake first"))
            return
        self._on_session_message(router, session, msg, len(frames[1]))

    def _on_session_message(self, router: Any, session: Session, msg: Any,
                            num_bytes: int = 0) -> None:
        if isinstance(msg, Draft):
            if not self.table.store_draft(session, msg, self.config.wire_formats, num_bytes):
                self._strike(router, session.identity)
        elif isinstance(msg, End) and msg.handle == NO_HANDLE:
            self.table.close_session(session.session_id, "device said goodbye")
        elif isinstance(msg, Pause):
            self.table.pause(session, msg.handle)
        elif not isinstance(msg, End):
            self.table.count("invalid_unexpected_type")
            self._strike(router, session.identity)

    def _take_token(self, identity: bytes) -> bool:
        with self.table.cond:
            return self.guards.allow(identity)

    def _strike(self, router: Any, identity: bytes) -> bool:
        """Count one abusive message; True when the sender is over the limit (send no reply)."""
        table = self.table
        with table.cond:
            if not self.guards.strike(identity):
                return False
            session_id = table.by_identity.get(identity)
            if session_id is None:  # no session to close: stay silent until the window ends
                return True
            self.guards.forgive(identity)  # a new session starts with a clean slate
            table.counters["sessions_closed_abuse"] += 1
        table.close_session(session_id, f"more than {ABUSE_MAX_STRIKES} invalid or over-limit "
                                        f"messages within {ABUSE_WINDOW_S:g} s")
        self._reply(router, identity, Error("session_closed", "too many invalid or over-limit "
                                            "messages; handshake again"))
        return True

    def _handshake_refusal(self, identity: bytes, hello: Handshake) -> tuple[str, str] | None:
        """(code, message) when this device cannot be served; None when it can."""
        # NOTE: the tokenizers must be identical; the models' logit widths may differ (checkpoints
        # pad their vocabularies differently, e.g. 151936 vs 152064 in one model family), as long
        # as every id the device can send is one the target has.
        if hello.vocab_fingerprint != self.vocab_fingerprint or hello.vocab_size > self.vocab_size:
            return ("vocab_mismatch",
                    f"device vocabulary (size {hello.vocab_size}, fingerprint "
                    f"{hello.vocab_fingerprint[:12]}) does not fit target {self.model_name!r} "
                    f"(size {self.vocab_size}, fingerprint {self.vocab_fingerprint[:12]}): the "
                    "draft model must use the target's tokenizer")
        wire = next((c[5:] for c in hello.capabilities if c.startswith("wire:")), "tslt")
        if wire not in self.config.wire_formats:
            return ("wire_format", f"this edge takes drafts in {list(self.config.wire_formats)}"
                    f" (speculative_config.wire_formats), not {wire!r}")
        with self.table.cond:
            full = len(self.table.sessions) >= self.config.max_sessions
            if full and identity not in self.table.by_identity:
                return ("too_many_sessions", f"the edge serves at most "
                        f"{self.config.max_sessions} devices (speculative_config.max_sessions)")
        return None

    def _on_handshake(self, router: Any, identity: bytes, hello: Handshake,
                      peer: str = "") -> None:
        reason = self._handshake_refusal(identity, hello)
        if reason is not None:
            self.table.count(f"handshake_refused_{reason[0]}")
            logger.warning("refused device handshake (%s): %s", reason[0], reason[1])
            self._reply(router, identity, Error(*reason))
            return
        old = self.table.session_id_of(identity)
        if old is not None:
            self.table.close_session(old, "device handshook again")
        session = self.table.open_session(secrets.token_urlsafe(18), identity, peer)
        limits = {"max_gamma": self.max_gamma, "max_k": self.config.max_k,
                  "max_candidates": self.config.max_candidates,
                  "max_payload_bytes": self.config.max_payload_bytes,
                  "draft_deadline_ms": int(self.config.draft_deadline_ms), **self.extra_limits}
        logger.info("device session %s... opened (draft model %r)", session.session_id[:6],
                    hello.model_name)
        self._reply(router, identity, Handshake(
            PROTOCOL_VERSION, self.vocab_size, self.vocab_fingerprint, self.model_name,
            CAPABILITIES + tuple(f"wire:{w}" for w in self.config.wire_formats), limits,
            session.session_id))

    def expire_idle_sessions(self, router: Any = None) -> None:
        """Close sessions idle past SESSION_IDLE_TIMEOUT_S and tell their devices (the I/O
        thread's periodic sweep; tests call it directly)."""
        for session_id, identity in self.table.idle_sessions():
            self.table.close_session(session_id, "idle")
            if router is not None:  # a connected but idle device must learn it, or its next
                # requests carry a session id the edge no longer knows and never get drafts
                self._reply(router, identity, Error("unknown_peer", "session expired after "
                                                    "being idle; handshake again"))

    def _reply(self, router: Any, identity: bytes, msg: Any) -> None:
        self._send_reply(router, identity, encode(msg))

    def _send_reply(self, router: Any, identity: bytes, data: bytes) -> None:
        try:
            router.send_multipart([identity, data], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.table.count("downlink_dropped_full")
            return
        self.table.count("downlink_bytes", len(data))
