"""The drafting loop: protocol events in, drafts out, proactive drafting, adaptive γ.

One thread owns the client (socket) and the drafter (torch); the HTTP front never waits on it.
Each loop iteration: advance the client's timers, take the edge's messages, then do one unit of
drafting work, batched across requests:

1. *urgent*: requests whose committed sequence has no draft yet get one more chain token each;
   a request whose chain reaches its γ sends ``Draft(chain[:γ])`` at once;
2. otherwise *proactive*: requests with a draft in flight keep extending the chain as if the draft
   will be accepted in full, including a guess for the edge's bonus token (chain position γ,
   sampled from q̃ like every other chain token), up to 2γ + 1 tokens. If the edge's commit equals
   the chain's head, the chain's tail is already the next draft and leaves immediately (a *hit*).
   With ``send_ahead`` it leaves even earlier: as soon as it is drafted, tagged with the expected
   sequence (the hub keeps drafts per assumed prefix), so on a hit the edge has it before the
   commit reaches the device and the round trip is saved too. A miss costs its uplink bytes only.
3. *branches* (``send_ahead`` and ``branch_budget`` > 0): once the chain holds the bonus guess, the
   request forks up to ``branch_budget`` branch states for other likely outcomes — rejected at j
   with a guessed correction, all accepted with another bonus guess (vllm_tslt/agent/branches.py
   says which, and why the choice is causal) — and each drafts γ tokens and sends them tagged with
   its prefix. Branch states extend in the same batched forward as the proactive chains
   (``next_batch``); a commit that equals a branch's prefix adopts the branch as the request's
   state, and the edge already holds its draft (a *branch hit*).

Between units the loop polls the socket without waiting, so a commit interrupts proactive work
after at most one forward pass. γ comes from ``GammaController`` when ``num_draft_tokens`` is
"auto" (0 = the edge decodes this step alone).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vllm_tslt.agent.adaptive import AdaptiveConfig, GammaController
from vllm_tslt.agent.branches import (
    AUTO_BRANCH_CAP,
    Branch,
    fork_branches,
    match_branch,
    plan_branches,
)
from vllm_tslt.agent.client import EdgeClient, HandshakeRefused
from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.drafter import CommitMismatch, Drafter, DraftState
from vllm_tslt.agent.link import EmulatedLink
from vllm_tslt.agent.track import SentDraft, Track
from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    Commit,
    DecodeLimits,
    EdgeStatus,
    End,
    Error,
    Handshake,
    Message,
    Pause,
    RequestStart,
)

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.02  # socket wait when there is no drafting work
MAX_REQUESTS = 256  # concurrent requests the device tracks (more are left to the edge alone)
# The hub keeps a few drafts per request (keyed by committed length) and evicts the smallest key
# when full, which is the one it needs next: keep at most this many ahead drafts outstanding.
MAX_AHEAD_OUTSTANDING = 2


class DraftRuntime:
    """Owns the edge session and the drafting loop; ``start()`` runs it in a daemon thread."""

    def __init__(self, config: AgentConfig, drafter: Drafter | None = None,
                 link: EmulatedLink | None = None) -> None:
        self.config = config
        self.drafter = drafter or Drafter(
            config.draft_model, config.device, config.dtype, config.sparsify_config(),
            config.candidates, wire_format=config.wire_format)
        vocab = self.drafter.vocab_size
        hello = Handshake(PROTOCOL_VERSION, vocab, self.drafter.fingerprint(),
                          self.drafter.model_name,
                          (("multi_candidate",) if config.candidates > 1 else ())
                          + (f"wire:{config.wire_format}",), {}, "")
        self.client = EdgeClient(
            config.edge, hello, DecodeLimits(vocab_size=vocab),
            handshake_timeout_s=config.handshake_timeout_s,
            reconnect_initial_s=config.reconnect_initial_s,
            reconnect_max_s=config.reconnect_max_s, silence_timeout_s=config.silence_timeout_s,
            send_hwm=config.send_hwm, recv_hwm=config.recv_hwm,
            curve_secret_key_file=config.curve_secret_key_file,
            curve_server_key_file=config.curve_server_key_file, link=link)
        fixed = None if config.adaptive else int(config.num_draft_tokens)
        self.gamma_ctl = GammaController(AdaptiveConfig(
            gamma_max=config.gamma_cap, fixed_gamma=fixed, min_speedup=config.min_speedup,
            probe_interval_s=config.probe_interval_s))
        self.tracks: dict[int, Track] = {}  # by the edge's request handle
        self._epoch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # why the loop ended, if it failed
        self.counters: dict[str, int] = {
            "requests": 0, "commits": 0, "drafts_sent": 0, "draft_tokens_sent": 0,
            "proactive_rounds": 0, "proactive_hits": 0, "rollbacks": 0, "steps_off": 0,
            "drafts_unused": 0, "accepted_tokens": 0, "rounds": 0, "ahead_sent": 0,
            "ahead_hits": 0, "chain_matched": 0, "edge_status": 0, "pauses_sent": 0,
            "ahead_tokens_sent": 0, "branches_forked": 0, "branches_sent": 0,
            "branch_tokens_sent": 0, "branch_bytes": 0, "branch_rounds": 0, "branch_hits": 0,
            "branch_misses": 0, "branch_adopted_unsent": 0}

    # ------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self.client.session_id

    def start(self) -> None:
        from vllm_tslt.protocol.sparse_payload import start_compiling_codec

        start_compiling_codec()  # where numba is installed: drafts encode in ~1/3 of the time
        self._thread = threading.Thread(target=self._run, name="tslt-draft-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("draft loop did not stop within %.1f s", timeout_s)
        self.client.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_session(self, timeout_s: float) -> bool:
        """True once a session exists; False at the deadline or if the loop died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.session_id:
                return True
            if self.failure is not None or (self._thread is not None and not self.running):
                return False
            time.sleep(0.01)
        return bool(self.session_id)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once()
        except HandshakeRefused as e:
            hint = ("Use a wire format the edge lists (--wire-format)" if e.code == "wire_format"
                    else "Use a draft model with the target's tokenizer (--draft-model)")
            logger.error("%s. %s.", e, hint)
            self.failure = e
        except Exception as e:  # a bug must not go silent: record it, log it, stop drafting
            logger.exception("draft loop failed")
            self.failure = e

    def run_once(self) -> None:
        """One loop iteration (public so tests can drive the loop without a thread)."""
        self.service(0.0 if self._has_work() else IDLE_POLL_S)
        self._work()

    def service(self, timeout_s: float) -> None:
        """Advance the client's timers and handle the edge's messages (waiting up to
        ``timeout_s`` for the first). The device farm (vllm_tslt.bench.farm) calls this, then
        ``next_batch`` / ``after_extend`` around one forward shared by many devices."""
        self.client.step()
        if self.client.epoch != self._epoch:  # new session: the edge knows none of our requests
            self._epoch = self.client.epoch
            self.tracks.clear()
        for msg in self.client.poll(timeout_s):
            self._handle(msg)

    # ------------------------------------------------------------------------------------------
    # Events from the edge
    # ------------------------------------------------------------------------------------------

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Commit):
            self._on_commit(msg)
        elif isinstance(msg, RequestStart):
            self._on_start(msg)
        elif isinstance(msg, End):
            self.tracks.pop(msg.handle, None)
        elif isinstance(msg, EdgeStatus):
            self.gamma_ctl.observe_edge_status(msg.step_ms / 1e3, msg.draft_token_ms / 1e3)
            self.counters["edge_status"] += 1
        elif isinstance(msg, Error):
            logger.warning("edge error for %s: %s %s", msg.request_id, msg.code, msg.message)

    def _on_start(self, msg: RequestStart) -> None:
        if len(self.tracks) >= MAX_REQUESTS or not msg.prompt_ids:
            logger.warning("not drafting for %s (tracking %d requests)", msg.request_id,
                           len(self.tracks))
            return
        limits = self.client.edge_limits
        params = msg.sampling_params
        caps = [self.config.gamma_cap, limits.get("max_gamma", 64), params.get("max_gamma") or 64]
        state = self.drafter.new_state(
            msg.request_id, msg.prompt_ids, params, k_max=limits.get("max_k"),
            candidates=min(self.config.candidates, limits.get("max_candidates", 16)),
            handle=msg.handle)
        max_tokens = params.get("max_tokens")
        max_len = len(msg.prompt_ids) + (max_tokens if isinstance(max_tokens, int) else 1 << 30)
        track = Track(state, max(1, min(int(c) for c in caps)), max_len)
        track.gamma = self._choose_gamma(track)
        self.tracks[msg.handle] = track
        self.counters["requests"] += 1

    def _on_commit(self, msg: Commit) -> None:
        track = self.tracks.get(msg.handle)
        if track is None:
            return
        now = time.monotonic()
        self.counters["commits"] += 1
        sent, state = track.sent, track.state
        if sent is not None and sent.committed_len == state.committed_len:
            self._observe_round(sent, msg, now)
        if track.last_commit_at is not None:
            if track.gamma:  # we were drafting for this interval: what did it deliver?
                self.gamma_ctl.observe_interval(len(msg.new_tokens), now - track.last_commit_at)
            elif msg.verified == 0 and msg.new_tokens:
                # The edge decoded alone: the target-only step time we compare against (a paused
                # request's commits come together, one token per plain step).
                self.gamma_ctl.observe_target_step((now - track.last_commit_at)
                                                   / len(msg.new_tokens))
        branch = self._take_branch(track, msg)
        if branch is not None:  # the edge committed a branch's prefix: it becomes the request
            track.state, matched = branch.state, -1
        else:
            try:
                matched = self.drafter.commit(state, msg.committed_len, msg.new_tokens)
            except CommitMismatch as e:
                logger.warning("dropping request: %s", e)
                self.tracks.pop(msg.handle, None)
                return
            self.counters["rollbacks"] += int(matched < 0)
        state = track.state
        ahead = track.ahead
        track.sent, track.ahead, track.last_commit_at = None, None, now
        track.keys_at_edge = {k for k in track.keys_at_edge if k >= state.committed_len}
        track.gamma = self._choose_gamma(track)
        if sent is not None and self.config.proactive and track.gamma:
            hit = (matched >= 0 or branch is not None) and state.chain_len >= track.gamma
            self.counters["proactive_rounds"] += 1
            self.counters["proactive_hits"] += int(hit)
            self.counters["chain_matched"] += int(matched >= 0)
            self.gamma_ctl.observe_proactive(hit)
        if branch is not None and branch.sent is not None:
            # The edge holds the branch's draft already; its round starts now.
            b = branch.sent
            track.sent = SentDraft(b.committed_len, b.tokens, now, b.num_bytes)
            track.gamma = len(b.tokens)
            self.counters["branch_hits"] += 1
            return
        self.counters["branch_adopted_unsent"] += int(branch is not None)
        if ahead is not None and matched >= 0 and ahead.committed_len == state.committed_len:
            # The edge holds this draft already (sent ahead); its round starts now.
            track.sent = SentDraft(ahead.committed_len, ahead.tokens, now, ahead.num_bytes)
            track.gamma = len(ahead.tokens)
            self.counters["ahead_hits"] += 1
        elif track.gamma and state.chain_len >= track.gamma:
            self._send(track)  # proactive hit: the next draft leaves at once

    def _take_branch(self, track: Track, msg: Commit) -> Branch | None:
        """Drop the request's branches; return the one whose prefix the commit equals, if any.
        Counts the round's sent branches that missed."""
        branches, track.branches, track.planned_levels = track.branches, [], 0
        hit, misses = match_branch(branches, track.state.committed_len, msg.committed_len,
                                   msg.new_tokens)
        self.counters["branch_misses"] += misses
        self.counters["branch_rounds"] += int(any(b.sent is not None for b in branches))
        return hit

    def _observe_round(self, sent: SentDraft, msg: Commit, now: float) -> bool:
        """Feed the estimator with a verified round; False if the edge did not use the draft
        (the commit says it verified none of it: late, paused or declined by its intake)."""
        if msg.verified == 0:
            self.counters["drafts_unused"] += 1
            return False
        gamma = min(len(sent.tokens), msg.verified)  # the edge may verify a prefix only
        accepted = 0
        while accepted < min(gamma, len(msg.new_tokens)) and \
                sent.tokens[accepted] == msg.new_tokens[accepted]:
            accepted += 1
        self.counters["rounds"] += 1
        self.counters["accepted_tokens"] += accepted
        self.gamma_ctl.observe_round(gamma, accepted, sent.num_bytes, now - sent.sent_at,
                                     len(sent.tokens))
        return True

    def _choose_gamma(self, track: Track) -> int:
        gamma = min(self.gamma_ctl.choose(time.monotonic()), track.max_gamma)
        gamma = track.limit(gamma)
        self.counters["steps_off"] += int(gamma == 0)
        if gamma == 0 and not track.paused and self.client.send(Pause(track.state.handle)):
            track.paused = True  # the edge decodes alone without waiting for us
            self.counters["pauses_sent"] += 1
        return gamma

    # ------------------------------------------------------------------------------------------
    # Drafting work
    # ------------------------------------------------------------------------------------------

    def _ship(self, track: Track, state: DraftState, gamma: int,
              offset: int = 0) -> SentDraft | None:
        """Send state's chain[offset:offset + γ] (Drafter.draft_message); None if not sent (not
        connected or queue full)."""
        draft = self.drafter.draft_message(state, gamma, offset)
        num_bytes = self.client.send(draft)
        if not num_bytes:
            return None
        track.paused = False  # any draft resumes waiting at the edge
        return SentDraft(draft.committed_len, draft.tokens.tolist(), time.monotonic(), num_bytes)

    def _send(self, track: Track) -> None:
        state, gamma = track.state, track.gamma
        track.sent = self._ship(track, state, gamma)
        if track.sent is not None:
            track.keys_at_edge.add(state.committed_len)
            self.counters["drafts_sent"] += 1
            self.counters["draft_tokens_sent"] += gamma
        else:
            track.gamma = 0  # not connected or queue full: this step goes without a draft

    def _proactive_wanted(self, t: Track) -> bool:
        return (self.config.proactive and t.sent is not None
                and t.state.chain_len < t.limit(2 * t.gamma + 1))

    def _has_work(self) -> bool:
        return any((t.gamma and t.sent is None) or self._proactive_wanted(t)
                   or any(self._branch_wanted(b) for b in t.branches)
                   for t in self.tracks.values())

    @staticmethod
    def _branch_wanted(b: Branch) -> bool:
        return b.sent is None and b.state.chain_len < b.gamma

    def _work(self) -> None:
        """One batched chain extension: urgent requests first, else proactive ones."""
        batch = self.next_batch()
        if batch:
            t0 = time.perf_counter()
            self.drafter.extend(batch)
            self.gamma_ctl.observe_draft(1, time.perf_counter() - t0)
        self.after_extend()

    def next_batch(self) -> list[DraftState]:
        """The states to extend by one chain token now: urgent requests, else proactive chains
        and branches (one batch)."""
        urgent = [t for t in self.tracks.values() if t.gamma and t.sent is None]
        batch = [t.state for t in urgent if t.state.chain_len < t.gamma]
        if not batch:  # nothing urgent: draft ahead
            batch = [t.state for t in self.tracks.values() if self._proactive_wanted(t)]
            batch += [b.state for t in self.tracks.values() for b in t.branches
                      if self._branch_wanted(b)]
        return batch

    def after_extend(self) -> None:
        """Send every draft (and draft ahead, and branch) whose chain is long enough now."""
        for t in self.tracks.values():
            if t.sent is None and t.gamma and t.state.chain_len >= t.gamma:
                self._send(t)
            elif t.sent is not None and self.config.send_ahead and t.ahead is None:
                self._send_ahead(t)
            if t.sent is not None and self.config.send_ahead:
                self._plan_branches(t)
                for b in list(t.branches):
                    if b.sent is None and b.state.chain_len >= b.gamma:
                        self._send_branch(t, b)

    def branch_budget(self, gamma: int) -> int:
        """Branches per round now (config ``branch_budget``; "auto": ``GammaController``)."""
        b = self.config.branch_budget
        if b == "auto":
            return self.gamma_ctl.branch_budget(gamma, AUTO_BRANCH_CAP)
        return int(b)

    def _plan_branches(self, track: Track) -> None:
        """Fork the branches for the draft in flight: the rejection levels as soon as it is out,
        the bonus level once the chain holds the bonus guess (row γ)."""
        state, sent = track.state, track.sent
        gamma = len(sent.tokens)  # type: ignore[union-attr]
        levels = min(state.chain_len, gamma + 1)
        if levels <= track.planned_levels:
            return
        if track.planned_levels == 0:  # one (α, budget) for the whole round
            track.plan_inputs = (self.gamma_ctl.alpha, self.branch_budget(gamma))
        done, track.planned_levels = track.planned_levels, levels
        alpha, budget = track.plan_inputs
        chain = state.chain_tokens()[:levels]
        if budget < 1 or not self.drafter.batchable or chain[:gamma] != sent.tokens[:levels]:  # type: ignore[union-attr]
            return
        plan = [(j, t) for j, t in plan_branches(state.chain_rows, chain, gamma, alpha, budget)
                if j >= done]  # levels planned before are forked already
        cap = min(track.gamma or gamma, self.gamma_ctl.branch_gamma(gamma))
        forked = fork_branches(self.drafter, state, plan,
                               lambda keep: min(cap, track.max_len - keep - 1))
        track.branches += forked
        self.counters["branches_forked"] += len(forked)

    def _send_branch(self, track: Track, branch: Branch) -> None:
        branch.sent = self._ship(track, branch.state, branch.gamma)
        if branch.sent is None:  # not connected or queue full: this branch is given up
            track.branches.remove(branch)
            return
        self.counters["branches_sent"] += 1
        self.counters["branch_tokens_sent"] += branch.gamma
        self.counters["branch_bytes"] += branch.sent.num_bytes

    def _send_ahead(self, track: Track) -> None:
        """Send chain[γ + 1 : γ + 1 + γ'] for the sequence committed + chain[:γ + 1], once drafted;
        γ' = ``GammaController.branch_gamma``: what the device drafts while the edge verifies, so
        that it reaches the edge before the commit does (as the branches)."""
        offset = len(track.sent.tokens) + 1  # type: ignore[union-attr]
        gamma = min(track.gamma, self.gamma_ctl.branch_gamma(track.gamma),
                    track.limit(1 << 30) - offset)
        if gamma < 1 or track.state.chain_len < offset + gamma or \
                track.ahead_outstanding() >= MAX_AHEAD_OUTSTANDING:
            return
        track.ahead = self._ship(track, track.state, gamma, offset)
        if track.ahead is not None:
            track.keys_at_edge.add(track.ahead.committed_len)
            self.counters["ahead_sent"] += 1
            self.counters["ahead_tokens_sent"] += gamma

    def stats(self) -> dict[str, Any]:
        c = self.counters
        rounds = c["proactive_rounds"]
        branch_rounds = c["branch_rounds"]
        return {**c, "proactive_hit_rate": c["proactive_hits"] / rounds if rounds else None,
                "branch_hit_rate": c["branch_hits"] / branch_rounds if branch_rounds else None,
                "acceptance": c["accepted_tokens"] / max(c["draft_tokens_sent"], 1),
                "active_requests": len(self.tracks), "forward_calls": self.drafter.forward_calls,
                "client": self.client.stats(), "gamma": self.gamma_ctl.snapshot()}
