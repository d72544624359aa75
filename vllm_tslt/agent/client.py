"""The device's ZeroMQ DEALER session with the edge's draft hub (docs/protocol.md).

States: ``disconnected`` -> (new socket, send Handshake) ``handshaking`` -> (edge's Handshake reply)
``ready``. Any of: no reply within ``handshake_timeout_s``, the TCP connection dropping (socket
monitor), ``Error(code="unknown_peer")`` (the edge restarted and forgot us), or silence while drafts
are outstanding -> close the socket and start again after an exponential backoff
(``reconnect_initial_s`` doubling up to ``reconnect_max_s``; reset by a successful handshake).
``Error(code="vocab_mismatch" | "bad_version" | "wire_format")`` in reply to our handshake raises
``HandshakeRefused``: the agent must not run against a target with another vocabulary (or one that
does not take its draft format).

Single-threaded: the runtime's loop owns the client. ``session_id`` (a str) may be read from any
thread. Sockets have LINGER 0, bounded high-water marks and IMMEDIATE (nothing is queued for a peer
that is not connected, so stale drafts never pile up).

CURVE (docs/security.md): with ``curve`` keys the socket authenticates itself with the device's
secret key and checks the edge's public key; a refused key shows up as a failed ZMTP handshake
(logged) and then as the usual handshake timeout and backoff.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from vllm_tslt.agent.link import EmulatedLink
from vllm_tslt.protocol import (
    NO_HANDLE,
    DecodeLimits,
    End,
    Error,
    Handshake,
    Message,
    ProtocolError,
    Reason,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

FATAL_CODES = ("vocab_mismatch", "bad_version", "wire_format")
_MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


def load_curve_keys(secret_key_file: str, server_key_file: str) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public) z85 keys for a CURVE client; ValueError naming the option."""
    import zmq.auth

    keys = []
    for option, path in (("curve_secret_key_file", secret_key_file),
                         ("curve_server_key_file", server_key_file)):
        try:
            keys.append(zmq.auth.load_certificate(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"{option}: cannot read a CURVE certificate from {path!r}: {e}") from None
    (public, secret), (server, _) = keys
    if secret is None or len(secret) != 40 or len(public) != 40:
        raise ValueError(f"curve_secret_key_file: {secret_key_file!r} has no secret key (give this "
                         "device's NAME.key_secret written by `vllm-tslt keys`)")
    if len(server) != 40:
        raise ValueError(f"curve_server_key_file: {server_key_file!r} holds no valid public key")
    return public, secret, server


class HandshakeRefused(RuntimeError):
    """The edge refused this device for good (wrong vocabulary or protocol version)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"edge refused the handshake ({code}): {message}")


class EdgeClient:
    """DEALER session with reconnect. Call ``step()`` and ``poll()`` from one loop."""

    def __init__(self, endpoint: str, hello: Handshake, limits: DecodeLimits, *,
                 handshake_timeout_s: float = 3.0, reconnect_initial_s: float = 0.2,
                 reconnect_max_s: float = 5.0, silence_timeout_s: float = 10.0,
                 send_hwm: int = 256, recv_hwm: int = 1024,
                 context: zmq.Context | None = None, curve_secret_key_file: str = "",
                 curve_server_key_file: str = "", link: EmulatedLink | None = None) -> None:
        self.endpoint = endpoint
        self.link = link  # an emulated link (benchmarks): frames wait in it as on a real one
        self.hello = hello
        self.limits = limits
        self.handshake_timeout_s = handshake_timeout_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.silence_timeout_s = silence_timeout_s
        self.send_hwm, self.recv_hwm = send_hwm, recv_hwm
        self._ctx = context or zmq.Context.instance()
        self._curve = (load_curve_keys(curve_secret_key_file, curve_server_key_file)
                       if curve_secret_key_file or curve_server_key_file else None)
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.state = "disconnected"
        self.session_id = ""
        self.edge_hello: Handshake | None = None
        self.epoch = 0  # +1 per established session: the runtime drops request state on change
        self._backoff = reconnect_initial_s
        self._next_attempt = 0.0
        self._deadline = 0.0
        self._hello_sent = False
        self._last_recv = 0.0
        self._unanswered_since: float | None = None
        self._inbox: deque[Message] = deque()
        self.counters: dict[str, int] = {"handshakes": 0, "reconnects": 0, "decode_errors": 0,
                                         "send_dropped": 0, "bytes_sent": 0, "messages_sent": 0,
                                         "auth_failures": 0}

    # ------------------------------------------------------------------------------------------
    # Connection state machine
    # ------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def socket(self) -> zmq.Socket | None:
        """The DEALER socket while one is open (for an external poller; do not read from it)."""
        return self._sock

    @property
    def edge_limits(self) -> dict[str, int]:
        return dict(self.edge_hello.limits) if self.edge_hello else {}

    def step(self, now: float | None = None) -> None:
        """Advance timers: open a socket when due, send the handshake, detect loss and silence."""
        now = time.monotonic() if now is None else now
        if self.state == "disconnected" and now >= self._next_attempt:
            self._open(now)
        if self._sock is None:
            return
        self._flush_link(now)
        if self._connection_lost():
            self._reset(now, "connection to the edge lost")
            return
        if self.state == "handshaking":
            if not self._hello_sent and self._sock.poll(0, zmq.POLLOUT):
                self._hello_sent = self._send_raw(encode(self.hello))
            if now > self._deadline:
                self._reset(now, f"no handshake reply within {self.handshake_timeout_s} s")
        elif self._unanswered_since is not None and (
                now - self._unanswered_since > self.silence_timeout_s
                and now - self._last_recv > self.silence_timeout_s):
            self._reset(now, f"edge silent for {self.silence_timeout_s} s")

    def _open(self, now: float) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.send_hwm)
        sock.setsockopt(zmq.RCVHWM, self.recv_hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, int(self.reconnect_initial_s * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.reconnect_max_s * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_payload_bytes)
        if self._curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._curve
        self._monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.endpoint)
        self._sock = sock
        self.state = "handshaking"
        self._hello_sent = False
        self._deadline = now + self.handshake_timeout_s
        logger.debug("connecting to %s", self.endpoint)

    def _connection_lost(self) -> bool:
        """Drain the monitor; a disconnect counts only once a session exists."""
        if self._monitor is None:
            return False
        lost = False
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            lost = lost or event["event"] == zmq.EVENT_DISCONNECTED
            if event["event"] != zmq.EVENT_DISCONNECTED:
                self.counters["auth_failures"] += 1
                logger.warning("the edge %s refused the secure (CURVE) handshake: is this device's "
                               "key in its curve_authorized_keys_dir, and curve_server_key_file "
                               "the edge's key (and both sides CURVE or neither)?", self.endpoint)
        return lost and self.state == "ready"

    def _reset(self, now: float, why: str) -> None:
        was_ready = self.state == "ready"
        self._close_socket()
        self.state = "disconnected"
        self.session_id = ""
        self._unanswered_since = None
        self._inbox.clear()
        self._next_attempt = now + self._backoff
        logger.warning("%s (%s); retrying in %.2f s", why, self.endpoint, self._backoff)
        self._backoff = min(self._backoff * 2, self.reconnect_max_s)
        self.counters["reconnects"] += int(was_ready)

    def _close_socket(self) -> None:
        if self.link is not None:
            self.link.clear()
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._sock = self._monitor = None

    def close(self) -> None:
        """Say goodbye (End with no request id: the edge frees the session now) and close."""
        if self.ready:
            self._send_raw(encode(End(NO_HANDLE, "device stopping")))
        self._close_socket()
        self.state = "disconnected"
        self.session_id = ""

    # ------------------------------------------------------------------------------------------
    # I/O
    # ------------------------------------------------------------------------------------------

    def _send_raw(self, data: bytes) -> bool:
        if self.link is not None:  # the link sends it when it is due
            self.link.send(data, time.monotonic())
            self.counters["bytes_sent"] += len(data)
            self.counters["messages_sent"] += 1
            return True
        try:
            self._sock.send(data, zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            self.counters["send_dropped"] += 1
            return False
        self.counters["bytes_sent"] += len(data)
        self.counters["messages_sent"] += 1
        return True

    def send(self, msg: Message) -> int:
        """Send when ready; returns the bytes sent, 0 if dropped (not ready or queue full)."""
        if not self.ready:
            self.counters["send_dropped"] += 1
            return 0
        data = encode(msg)
        if not self._send_raw(data):
            return 0
        if self._unanswered_since is None:
            self._unanswered_since = time.monotonic()
        return len(data)

    def poll(self, timeout_s: float) -> list[Message]:
        """Messages for the runtime (RequestStart, Commit, End, Error with a request id), waiting up
        to ``timeout_s`` for the first; handshake traffic is handled here."""
        if self._sock is None:
            time.sleep(max(0.0, min(timeout_s, self._next_attempt - time.monotonic())))
            return []
        if self.link is not None:
            due = self.link.next_due()
            if due is not None:
                timeout_s = min(timeout_s, max(0.0, due - time.monotonic()))
        if not self._inbox and self._sock.poll(int(timeout_s * 1000)):
            while len(self._inbox) < self.recv_hwm:
                try:
                    data = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if self.link is not None:
                    self.link.arrive(data, time.monotonic())
                    continue
                self._receive(data)
                if self._sock is None:  # reset while handling
                    break
        if self.link is not None:
            self._flush_link(time.monotonic())
        out = list(self._inbox)
        self._inbox.clear()
        return out

    def _flush_link(self, now: float) -> None:
        """Hand over what the emulated link delivers by now: uplink to the socket, downlink to us."""
        if self.link is None or self._sock is None:
            return
        for data in self.link.due_up(now):
            try:
                self._sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                self.counters["send_dropped"] += 1
        for data in self.link.due_down(now):
            self._receive(data)
            if self._sock is None:  # reset while handling
                return

    def _receive(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            msg = decode(data, self.limits)
        except ProtocolError as e:
            self.counters["decode_errors"] += 1
            if e.reason == Reason.BAD_VERSION and self.state == "handshaking":
                self.close()  # an edge of another protocol version (its refusal, or its reply)
                raise HandshakeRefused("bad_version", e.detail) from e
            logger.warning("dropped a frame from the edge: %s", e)
            return
        self._last_recv = now
        self._unanswered_since = None
        if isinstance(msg, Handshake):
            self._on_handshake(msg, now)
        elif isinstance(msg, Error) and not msg.request_id:
            self._on_error(msg, now)
        elif self.ready:
            self._inbox.append(msg)

    def _on_handshake(self, reply: Handshake, now: float) -> None:
        if self.state != "handshaking":
            logger.debug("ignoring an unexpected handshake from the edge")
            return
        if (reply.vocab_fingerprint != self.hello.vocab_fingerprint
                or reply.vocab_size < self.hello.vocab_size):  # same tokenizer; ids must fit
            raise HandshakeRefused("vocab_mismatch",
                                   f"edge target {reply.model_name!r} has vocab_size "
                                   f"{reply.vocab_size} / fingerprint {reply.vocab_fingerprint}, "
                                   f"the draft {self.hello.model_name!r} has {self.hello.vocab_size}"
                                   f" / {self.hello.vocab_fingerprint}")
        if not reply.session_id:
            self._reset(now, "edge handshake reply without a session id")
            return
        self.edge_hello = reply
        self.session_id = reply.session_id
        self.state = "ready"
        self.epoch += 1
        self._backoff = self.reconnect_initial_s
        self.counters["handshakes"] += 1
        logger.info("session %s with %s (target %s, limits %s)", reply.session_id, self.endpoint,
                    reply.model_name, reply.limits)

    def _on_error(self, err: Error, now: float) -> None:
        if err.code in FATAL_CODES and self.state == "handshaking":
            self.close()
            raise HandshakeRefused(err.code, err.message)
        if err.code == "unknown_peer":
            self._reset(now, "edge does not know this session (restarted?)")
            self._next_attempt = now  # handshake again at once
            return
        if err.code == "session_closed":  # the edge closed us for abuse: back off, then again
            self._reset(now, f"edge closed the session: {err.message}")
            return
        logger.warning("edge error %s: %s", err.code, err.message)

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "session_id": self.session_id, **self.counters}
