"""The draft hub's state: device sessions, request bindings and stored drafts (no sockets here).

`SessionTable` holds every table of one hub behind one condition, `cond`, shared by two threads:

- the I/O thread (`device_endpoint.DeviceEndpoint`) opens and closes sessions, stores the drafts
  and pauses devices send, and notifies `cond` for each;
- the engine thread (`hub.DraftHub`) binds, advances and unbinds requests and `collect`s drafts,
  waiting on `cond` until each request has a draft for its committed sequence or the deadline.

The hub's counters live here too, so that both threads count under the same lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vllm_tslt.core.float_q import FloatQ
from vllm_tslt.protocol import Draft, PrefixHasher

from .intake import Lateness

logger = logging.getLogger(__name__)

MAX_DRAFTS_PER_REQUEST = 4  # bound of BoundRequest.drafts (it holds the committed length's)
# Drafts kept per request for prefixes longer than the committed one (sent ahead: the device's
# chain and its branches, several per length); the furthest ahead are evicted first.
MAX_PENDING_DRAFTS = 16
# A session with no traffic and no requests is forgotten after this long (read at every sweep:
# tests lower it on this module).
SESSION_IDLE_TIMEOUT_S = 300.0
# After this many steps in a row without a usable draft, the engine stops waiting for a session
# (a stalled or vanished device costs at most this many deadlines) until it sends a draft again.
MAX_MISSED_DEADLINES = 3
COMMIT_TIMES_KEPT = 8  # commit times kept per request, to measure the lateness of late drafts
# A paused device (adaptive γ off: it drafts nothing until its next probe) needs the committed
# tokens only to keep its context for that probe, so its commits are held back and sent together
# at most this often instead of one per engine step: a bound but idle device then costs the edge
# a message every PAUSED_COMMIT_INTERVAL_S, not every step. Its probe waits up to this long more.
PAUSED_COMMIT_INTERVAL_S = 0.1


class CommitLengthError(ValueError):
    """The engine's committed length disagrees with the tokens the hub was told about."""


@dataclass
class Session:
    session_id: str
    identity: bytes  # the ZeroMQ routing id of the device's DEALER socket
    peer: str = ""  # the CURVE public key (z85) that opened the session; "" without CURVE
    requests: set[str] = field(default_factory=set)
    handles: dict[int, str] = field(default_factory=dict)  # the device's names -> request ids
    next_handle: int = 1  # handles are never reused within a session
    last_seen: float = field(default_factory=time.monotonic)
    missed: int = 0  # consecutive collect() deadlines this session's requests missed
    lateness: Lateness = field(default_factory=Lateness)  # commit -> its draft's arrival


@dataclass
class BoundRequest:
    session_id: str
    hasher: PrefixHasher  # the committed sequence, as a length and a rolling hash
    drafts: dict[int, Draft] = field(default_factory=dict)  # committed_len -> latest draft
    # Drafts sent ahead, by the prefix they assume: (committed_len, prefix_hash) -> draft. The
    # one whose prefix the engine commits moves to `drafts` (`_promote_locked`), the rest go.
    pending: dict[tuple[int, int], Draft] = field(default_factory=dict)
    paused: bool = False  # the device said it sends no drafts until its next one (Pause)
    handle: int = 0  # the request's name on the wire, within its session (RequestStart.handle)
    # committed length -> when the edge committed it (monotonic), until a draft answers it; the
    # last COMMIT_TIMES_KEPT
    commit_times: dict[int, float] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)  # committed tokens not yet told (paused)
    told_at: float = 0.0  # when the device was last sent a commit (monotonic)
    # A draft came while tokens were held: the next commit tells them and ends the pause (until
    # then the edge does not wait for a draft the device cannot make: it lacks the prefix).
    resuming: bool = False

    def committed(self, length: int) -> None:
        self.commit_times[length] = time.monotonic()
        if len(self.commit_times) > COMMIT_TIMES_KEPT:
            del self.commit_times[min(self.commit_times)]


class SessionTable:
    """Sessions by id and by routing id, requests bound to them, their drafts, and counters."""

    def __init__(self, max_requests_per_session: int, forgive_late: bool = False) -> None:
        self.max_requests_per_session = max_requests_per_session
        # A late draft shows its device is alive: with the adaptive intake (which waits only as
        # long as the device's measured lateness makes worth it) it clears the session's missed
        # waits, so a device that was slow for a while is considered again. With intake "wait"
        # it does not (a device slower than the deadline would cost a deadline every step).
        self.forgive_late = forgive_late
        self.cond = threading.Condition()
        self.counters: Counter[str] = Counter()
        self.sessions: dict[str, Session] = {}
        self.by_identity: dict[bytes, str] = {}
        self.requests: dict[str, BoundRequest] = {}

    def count(self, name: str, n: int = 1) -> None:
        with self.cond:
            self.counters[name] += n

    def count_many(self, counts: dict[str, int]) -> None:
        """Several counters under one lock (the engine step's bookkeeping)."""
        with self.cond:
            for name, n in counts.items():
                self.counters[name] += n

    def snapshot(self) -> dict[str, int]:
        with self.cond:
            out = dict(self.counters)
            out["sessions_active"] = len(self.sessions)
            out["requests_active"] = len(self.requests)
        return out

    # ------------------------------------------------------------------ sessions (I/O thread)

    def has_session(self, session_id: str) -> bool:
        with self.cond:
            return session_id in self.sessions

    def session_id_of(self, identity: bytes) -> str | None:
        with self.cond:
            return self.by_identity.get(identity)

    def open_session(self, session_id: str, identity: bytes, peer: str) -> Session:
        session = Session(session_id, identity, peer)
        with self.cond:
            self.sessions[session_id] = session
            self.by_identity[identity] = session_id
            self.counters["sessions_opened"] += 1
        return session

    def close_session(self, session_id: str, why: str) -> None:
        """Forget a session; its requests stay bound (the engine ends them) but lose their drafts."""
        with self.cond:
            session = self.sessions.pop(session_id, None)
            if session is None:
                return
            if self.by_identity.get(session.identity) == session_id:
                del self.by_identity[session.identity]
            for rid in session.requests:
                req = self.requests.get(rid)
                if req is not None:
                    req.drafts.clear()
                    req.pending.clear()
            self.counters["sessions_closed"] += 1
            self.cond.notify_all()
        logger.info("device session %s... closed: %s", session_id[:6], why)

    def session_for(self, identity: bytes, peer: str) -> Session | None:
        """The sender's session, if it has one opened by the same authenticated key."""
        with self.cond:
            session_id = self.by_identity.get(identity)
            session = self.sessions.get(session_id) if session_id else None
            if session is not None and session.peer == peer:
                session.last_seen = time.monotonic()
                return session
        if session is not None:  # another key took over this routing id: its downlink too
            self.count("invalid_wrong_peer")
            self.close_session(session.session_id, "routing id reused by another CURVE key")
        return None

    def idle_sessions(self) -> list[tuple[str, bytes]]:
        """(session id, routing id) of every session without requests idle for too long."""
        now = time.monotonic()
        with self.cond:
            return [(s.session_id, s.identity) for s in self.sessions.values()
                    if not s.requests and now - s.last_seen > SESSION_IDLE_TIMEOUT_S]

    # ------------------------------------------------------------------ requests (engine thread)

    def is_bound(self, request_id: str) -> bool:
        with self.cond:
            return request_id in self.requests

    def bind(self, request_id: str, session_id: str,
             prompt_ids: Sequence[int]) -> tuple[bytes, int] | None:
        """Bind a request to a session: (the session's routing id, the request's handle), or None
        (no such session, or the session is at `max_requests_per_session`)."""
        hasher = PrefixHasher(prompt_ids)
        with self.cond:
            session = self.sessions.get(session_id)
            if session is None:
                self.counters["requests_unknown_session"] += 1
                return None
            if len(session.requests) >= self.max_requests_per_session:
                self.counters["requests_over_session_limit"] += 1
                return None
            handle = session.next_handle
            session.next_handle += 1
            session.requests.add(request_id)
            session.handles[handle] = request_id
            self.requests[request_id] = BoundRequest(session_id, hasher, handle=handle)
            self.requests[request_id].committed(hasher.length)
            self.counters["requests_bound"] += 1
            return session.identity, handle

    def advance(self, request_id: str, committed_len: int, new_tokens: Sequence[int],
                verified: int = 0) -> tuple[bytes, int, tuple[int, ...]] | None:
        """Append committed tokens and drop drafts for shorter prefixes. Returns whom to tell:
        (the device's routing id, the request's handle, the committed tokens held back before
        new_tokens, which the device has not been told yet), or None: not bound, its session is
        gone, or the request is paused and new_tokens are held back too (PAUSED_COMMIT_INTERVAL_S;
        a step that verified drafts, or the first after the device drafts again, is never held).
        Raises CommitLengthError, changing nothing, when committed_len is not the bound length
        plus len(new_tokens)."""
        with self.cond:
            req = self.requests.get(request_id)
            if req is None:
                return None
            expected = req.hasher.length + len(new_tokens)
            if committed_len != expected:
                raise CommitLengthError(
                    f"commit for {request_id}: length {committed_len} after {len(new_tokens)} "
                    f"new tokens, expected {expected}")
            now = time.monotonic()
            hold = (req.paused and not req.resuming and verified == 0
                    and now - req.told_at < PAUSED_COMMIT_INTERVAL_S)
            req.hasher.update(new_tokens)
            if not hold:  # lateness counts from when the device is told
                if req.paused:  # a paused device answers none of the older commits
                    req.commit_times.clear()
                req.committed(committed_len)
            req.drafts = {n: d for n, d in req.drafts.items() if n >= committed_len}
            self._promote_locked(req)
            session = self.sessions.get(req.session_id)
            if session is None:
                return None
            if hold:
                req.held.extend(new_tokens)
                self.counters["commits_held"] += 1
                return None
            held, req.held, req.told_at = tuple(req.held), [], now
            if req.resuming:  # told everything: wait for its drafts from now on
                req.paused = req.resuming = False
            return session.identity, req.handle, held

    def unbind(self, request_id: str) -> tuple[bytes, int] | None:
        """Forget a request and its drafts. (The routing id of its live session, its handle), or
        None."""
        with self.cond:
            req = self.requests.pop(request_id, None)
            if req is None:
                return None
            session = self.sessions.get(req.session_id)
            if session is None:
                return None
            session.requests.discard(request_id)
            session.handles.pop(req.handle, None)
            return session.identity, req.handle

    def identities_with_requests(self) -> list[bytes]:
        with self.cond:
            return [s.identity for s in self.sessions.values() if s.requests]

    # ------------------------------------------------------------------ drafts

    def store_draft(self, session: Session, draft: Draft, wire_formats: Iterable[str],
                    num_bytes: int = 0) -> bool:
        """Store a draft for its request (I/O thread). False: the draft was abusive (a wire
        format this edge does not take). ``num_bytes``: its frame's size (counted for drafts
        sent ahead).

        A draft for the committed length goes to ``drafts`` (where `collect` looks), but never
        replaces one for the committed *prefix* with one for another prefix; a draft for a longer
        prefix waits in ``pending`` under (committed_len, prefix_hash) until a commit decides.

        NOTE: a draft names its request by a handle of the sender's own session, so a device
        cannot draft for another session's requests (another key's: CURVE, docs/security.md)."""
        with self.cond:
            self.counters["drafts_received"] += 1
            wire = draft.q.wire if isinstance(draft.q, FloatQ) else "tslt"
            if wire not in wire_formats:
                self.counters["invalid_wire_format"] += 1
                return False
            req = self._request_of(session, draft.handle)
            if req is None:
                self.counters["dropped_unknown_request"] += 1
                return True
            if req.held:  # it drafted for a prefix it was told; tell it the rest first
                req.resuming = True
            else:
                req.paused = False  # drafting again: wait for its drafts from now on
            # Lateness from the oldest commit this draft answers: a busy device drafts for the
            # latest context only, so that is how long a request left waiting would wait. A draft
            # sent ahead (for a longer prefix) answers no commit yet: if its prefix is committed,
            # it was there in time (lateness 0, `_promote_locked`).
            answered = [n for n in req.commit_times if n <= draft.committed_len] \
                if draft.committed_len <= req.hasher.length else []
            if answered:
                session.lateness.add(time.monotonic() - req.commit_times[min(answered)])
                for n in answered:
                    del req.commit_times[n]
                if self.forgive_late:
                    session.missed = 0
            if draft.committed_len < req.hasher.length:
                self.counters["dropped_late"] += 1
                return True
            if draft.committed_len > req.hasher.length:
                self._store_pending_locked(req, draft, num_bytes)
            else:
                phash = req.hasher.value()
                current = req.drafts.get(draft.committed_len)
                if current is None or current.prefix_hash != phash or draft.prefix_hash == phash:
                    req.drafts[draft.committed_len] = draft
                else:  # another prefix's draft never displaces the committed prefix's
                    self.counters["dropped_stale"] += 1
            session.missed = 0
            self.cond.notify_all()
        return True

    def _store_pending_locked(self, req: BoundRequest, draft: Draft, num_bytes: int) -> None:
        self.counters["drafts_ahead"] += 1
        self.counters["drafts_ahead_bytes"] += num_bytes
        key = (draft.committed_len, draft.prefix_hash)
        req.pending.pop(key, None)  # the latest for a prefix wins (and counts as the newest)
        req.pending[key] = draft
        while len(req.pending) > MAX_PENDING_DRAFTS:  # the furthest ahead, oldest first
            furthest = max(n for n, _ in req.pending)
            del req.pending[next(k for k in req.pending if k[0] == furthest)]
            self.counters["drafts_ahead_evicted"] += 1

    def _promote_locked(self, req: BoundRequest) -> None:
        """After a commit: the pending draft for the committed prefix becomes the step's draft;
        pending drafts for other prefixes of this length or shorter can never be used."""
        length, phash = req.hasher.length, req.hasher.value()
        hit = req.pending.pop((length, phash), None)
        if hit is not None:
            self.counters["drafts_ahead_hits"] += 1
            answered = [n for n in req.commit_times if n <= length]
            if length in answered:  # it was there in time for its commit
                session = self.sessions.get(req.session_id)
                if session is not None:
                    session.lateness.add(0.0)
            for n in answered:  # older commits the device skipped are answered too
                del req.commit_times[n]
            current = req.drafts.get(length)
            if current is None or current.prefix_hash != phash:
                req.drafts[length] = hit
        dead = [key for key in req.pending if key[0] <= length]
        for key in dead:
            del req.pending[key]
        self.counters["drafts_ahead_misses"] += len(dead)

    def _request_of(self, session: Session, handle: int) -> BoundRequest | None:
        request_id = session.handles.get(handle)
        return None if request_id is None else self.requests.get(request_id)

    def pause(self, session: Session, handle: int) -> None:
        """The device sends no drafts for this request until its next one (I/O thread)."""
        with self.cond:
            req = self._request_of(session, handle)
            if req is None:
                self.counters["dropped_unknown_request"] += 1
                return
            req.paused = True
            self.counters["pauses"] += 1
            self.cond.notify_all()

    def in_flight(self, request_ids: Iterable[str]) -> dict[str, float | None]:
        """The requests whose draft for their committed sequence may still come, each with the
        seconds until it is expected (its device's `Lateness` less the time since the commit;
        None: the device has no lateness sample yet). Requests with a usable draft, paused or
        unbound ones, and those of unresponsive sessions are left out (nothing to wait for)."""
        now = time.monotonic()
        out: dict[str, float | None] = {}
        with self.cond:
            for rid in request_ids:
                expected = self._expected_locked(rid)
                if expected is None:
                    continue
                req = self.requests[rid]
                session = self.sessions[req.session_id]
                draft = req.drafts.get(expected[0])
                if req.paused or session.missed >= MAX_MISSED_DEADLINES or (
                        draft is not None and draft.prefix_hash == expected[1]):
                    continue
                lateness = session.lateness.estimate()
                sent_at = req.commit_times.get(expected[0], now)
                out[rid] = None if lateness is None else max(0.0, lateness - (now - sent_at))
        return out

    def collect(self, request_ids: Iterable[str], deadline_s: float,
                wait_for: Iterable[str] | None = None, defer: Iterable[str] = ()
                ) -> dict[str, Draft]:
        """Wait until each request (of `wait_for`, default all) has a draft for its committed
        sequence, or the deadline; return the usable drafts of all `request_ids`.

        Drafts that arrive later, or for another prefix, are not used for this step; every request
        without a usable draft is counted under `dropped_<reason>` (missing or stale), except
        those in `defer` (parked by the intake policy: they are collected again next step). Only
        sessions waited for and missed count towards `MAX_MISSED_DEADLINES`.
        """
        t0 = time.monotonic()
        end = t0 + max(0.0, deadline_s)
        found: dict[str, Draft] = {}
        deferred = set(defer)
        with self.cond:
            wanted = {rid: p for rid in request_ids if (p := self._expected_locked(rid))}
            waited = set(wanted) if wait_for is None else set(wait_for) & set(wanted)
            sessions = {rid: self.sessions[self.requests[rid].session_id] for rid in wanted}
            responsive = {rid for rid in waited if sessions[rid].missed < MAX_MISSED_DEADLINES}
            settled: set[str] = set()  # paused (before or during the wait): nothing will come
            while True:
                for rid, (length, phash) in wanted.items():
                    req = self.requests.get(rid)
                    draft = req.drafts.get(length) if req is not None else None
                    if draft is not None and draft.prefix_hash == phash:
                        found[rid] = draft
                    elif req is not None and req.paused:
                        settled.add(rid)
                now = time.monotonic()
                if responsive <= found.keys() | settled or now >= end:
                    break
                self.cond.wait(timeout=end - now)
            for session in {id(sessions[rid]): sessions[rid] for rid in waited}.values():
                got = any(rid in found or rid in settled for rid in session.requests)
                session.missed = 0 if got else session.missed + 1
            self._count_collected({rid: p for rid, p in wanted.items()
                                   if rid in found or rid not in deferred}, found, settled)
            self.counters["steps_waited"] += 1 if wanted else 0
            self.counters["wait_us"] += int((time.monotonic() - t0) * 1e6) if wanted else 0
        return found

    def _count_collected(self, wanted: dict[str, tuple[int, int]], found: dict[str, Draft],
                         settled: set[str]) -> None:
        for rid, (length, _) in wanted.items():
            req = self.requests.get(rid)
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

    def _expected_locked(self, request_id: str) -> tuple[int, int] | None:
        req = self.requests.get(request_id)
        if req is None or req.session_id not in self.sessions:
            return None
        return req.hasher.length, req.hasher.value()
