"""Per-peer limits and authentication for the draft hub (docs/security.md).

`PeerGuards` keeps, per ZeroMQ routing id, a token bucket (`max_messages_per_s`, burst of one
second) and a strike window: more than `ABUSE_MAX_STRIKES` invalid or over-limit messages within
`ABUSE_WINDOW_S` mean the sender is abusive. The table is bounded (least recently seen evicted).
`enable_curve` turns the hub's ROUTER into a CURVE server with ZeroMQ's ZAP handler.
Not thread-safe: the hub calls it under its own lock.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import zmq

ABUSE_MAX_STRIKES = 64
ABUSE_WINDOW_S = 10.0
PEER_TABLE_SLACK = 1024  # guards kept for at most max_sessions + this many routing ids
ZAP_DOMAIN = "tslt"  # pyzmq's authenticator looks certificates up by the exact domain


@dataclass
class _PeerGuard:
    tokens: float
    stamp: float
    strikes: int = 0
    window_start: float = 0.0


class PeerGuards:
    def __init__(self, rate_per_s: float, max_entries: int) -> None:
        self.rate = float(rate_per_s)
        self.max_entries = max_entries
        self._guards: OrderedDict[bytes, _PeerGuard] = OrderedDict()

    def __len__(self) -> int:
        return len(self._guards)

    def allow(self, identity: bytes) -> bool:
        """Take one token from this routing id's bucket; False when it is empty."""
        now = time.monotonic()
        guard = self._guards.get(identity)
        if guard is None:
            guard = self._guards[identity] = _PeerGuard(self.rate, now, window_start=now)
            while len(self._guards) > self.max_entries:
                self._guards.popitem(last=False)
        else:
            self._guards.move_to_end(identity)
        guard.tokens = min(self.rate, guard.tokens + (now - guard.stamp) * self.rate)
        guard.stamp = now
        if guard.tokens < 1.0:
            return False
        guard.tokens -= 1.0
        return True

    def strike(self, identity: bytes) -> bool:
        """Count one abusive message; True when the sender is over the limit."""
        guard = self._guards.get(identity)
        if guard is None:
            return False
        now = time.monotonic()
        if now - guard.window_start > ABUSE_WINDOW_S:
            guard.window_start, guard.strikes = now, 0
        guard.strikes += 1
        return guard.strikes > ABUSE_MAX_STRIKES

    def forgive(self, identity: bytes) -> None:
        """A fresh strike window (after the sender's session was closed)."""
        guard = self._guards.get(identity)
        if guard is not None:
            guard.window_start, guard.strikes = time.monotonic(), 0


def enable_curve(ctx: zmq.Context, router: zmq.Socket, secret_key_file: str,
                 authorized_keys_dir: str) -> Any:
    """Make `router` a CURVE server; returns the started ZAP authenticator (stop it on close)."""
    from zmq.auth import CURVE_ALLOW_ANY
    from zmq.auth.thread import ThreadAuthenticator

    from .keys_cli import load_secret_certificate

    public, secret = load_secret_certificate(secret_key_file,
                                             "speculative_config.curve_secret_key_file")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=authorized_keys_dir or CURVE_ALLOW_ANY)
    router.curve_server = True
    router.curve_publickey = public
    router.curve_secretkey = secret
    router.zap_domain = ZAP_DOMAIN.encode()
    return auth
