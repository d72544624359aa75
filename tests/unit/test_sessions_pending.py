"""The hub's draft store with send-ahead branches: several pending drafts per request, keyed by the
prefix they assume (committed_len, prefix_hash); a commit promotes the one for its prefix."""

from __future__ import annotations

import pytest
import torch

from vllm_tslt.core.sparsify import SparseQ
from vllm_tslt.edge.sessions import MAX_PENDING_DRAFTS, SessionTable
from vllm_tslt.protocol import Draft, prefix_hash

pytestmark = pytest.mark.unit
PROMPT = [1, 2, 3]


def _draft(seq: list[int], tokens: list[int]) -> Draft:
    t = torch.tensor(tokens)
    return Draft(1, len(seq), prefix_hash(seq), t, SparseQ.one_hot(t))


@pytest.fixture()
def table():
    table = SessionTable(8)
    session = table.open_session("s", b"dev", "")
    assert table.bind("r", "s", PROMPT) == (b"dev", 1)
    return table, session


def _store(table, session, draft: Draft) -> None:
    assert table.store_draft(session, draft, ["tslt"], num_bytes=50)


def test_commit_picks_the_branch_for_its_prefix(table) -> None:
    table, session = table
    branches = {c: _draft([*PROMPT, c], [c + 10, c + 11]) for c in (5, 6, 7)}  # level 0, 3 guesses
    for d in branches.values():
        _store(table, session, d)
    _store(table, session, _draft([*PROMPT, 4, 4, 9], [1]))  # all accepted + a bonus guess
    assert table.collect(["r"], 0.0) == {}  # nothing for the committed prompt itself
    table.advance("r", 4, [6])
    got = table.collect(["r"], 0.0)["r"]
    assert torch.equal(got.tokens, branches[6].tokens)
    snap = table.snapshot()
    assert snap["drafts_ahead"] == 4 and snap["drafts_ahead_bytes"] == 200
    assert snap["drafts_ahead_hits"] == 1 and snap["drafts_ahead_misses"] == 2  # 5 and 7
    assert list(table.requests["r"].pending) == [(6, prefix_hash([*PROMPT, 4, 4, 9]))]
    table.advance("r", 6, [1, 2])  # the bonus guess's prefix did not come true either
    assert table.collect(["r"], 0.0) == {} and table.snapshot()["drafts_ahead_misses"] == 3
    assert not table.requests["r"].pending


def test_a_draft_for_another_prefix_never_replaces_the_committed_prefixs(table) -> None:
    table, session = table
    seq = [*PROMPT, 8]
    table.advance("r", 4, [8])
    good, other = _draft(seq, [3, 3]), _draft([*PROMPT, 9], [4, 4])  # same length, other prefix
    _store(table, session, other)
    _store(table, session, good)  # replaces the useless one
    _store(table, session, other)  # a branch that arrives after the commit: kept out
    assert torch.equal(table.collect(["r"], 0.0)["r"].tokens, good.tokens)


def test_a_wrong_prefix_alone_is_stale(table) -> None:
    table, session = table
    _store(table, session, _draft([*PROMPT, 4], [1]))  # pending, for a prefix that won't come
    table.advance("r", 4, [5])
    assert table.collect(["r"], 0.0) == {}
    assert table.snapshot()["drafts_ahead_misses"] == 1


def test_pending_drafts_are_bounded_furthest_first(table) -> None:
    table, session = table
    for n in range(3 * MAX_PENDING_DRAFTS):
        _store(table, session, _draft([*PROMPT, *range(n % 5 + 1), n], [1]))
    pending = table.requests["r"].pending
    assert len(pending) == MAX_PENDING_DRAFTS
    assert table.snapshot()["drafts_ahead_evicted"] == 2 * MAX_PENDING_DRAFTS
    assert max(n for n, _ in pending) < len(PROMPT) + 5  # the furthest ahead went first
    table.close_session("s", "test")
    assert not table.requests["r"].pending


def test_lateness_counts_a_draft_sent_ahead_as_in_time(table) -> None:
    """The intake policy's lateness: a draft for a longer prefix answers no commit when it arrives
    (measuring it from the current commit was the time since that commit, and took away the
    commit time its own draft is measured from); promoted by its commit, it was in time (0)."""
    table, session = table
    table.advance("r", 4, [5])
    _store(table, session, _draft([*PROMPT, 5, 6], [7]))  # ahead: assumes the next commit is [6]
    assert session.lateness.estimate() is None
    table.advance("r", 5, [6])  # it came true: the draft was there at its commit
    assert session.lateness.estimate() == 0.0
    table.advance("r", 6, [7])
    _store(table, session, _draft([*PROMPT, 5, 6, 7], [8]))  # answers the commit just made
    assert 0.0 < session.lateness.mean.value < 0.5  # since commit 6 (3 and 4 went with 5)
    assert not table.requests["r"].commit_times


def test_a_paused_devices_commits_are_held_and_sent_together(table, monkeypatch) -> None:
    """A paused device is told its committed tokens at most every PAUSED_COMMIT_INTERVAL_S, the
    held ones with the step's (`advance` returns the held ones); a step that verified drafts is
    told at once; nothing is lost or reordered, and the hash follows every token."""
    from vllm_tslt.edge import sessions

    table, session = table
    clock = [100.0]
    monkeypatch.setattr(sessions.time, "monotonic", lambda: clock[0])
    assert table.advance("r", 4, [4]) == (b"dev", 1, ())  # not paused: told every step
    table.pause(session, 1)
    clock[0] += 0.01
    assert table.advance("r", 5, [5]) is None  # paused, told 10 ms ago: held
    clock[0] += 0.01
    assert table.advance("r", 7, [6, 7]) is None
    clock[0] += sessions.PAUSED_COMMIT_INTERVAL_S
    assert table.advance("r", 8, [8]) == (b"dev", 1, (5, 6, 7))  # the interval passed
    assert table.counters["commits_held"] == 2
    # Only the commit it was told counts for lateness: the older ones it will never answer.
    assert list(table.requests["r"].commit_times) == [8]
    clock[0] += 0.01
    assert table.advance("r", 9, [9]) is None
    clock[0] += 0.001
    assert table.advance("r", 11, [10, 11], verified=1) == (b"dev", 1, (9,))  # verified
    # The hash followed every token, held or told: a draft for the full prefix is usable.
    _store(table, session, _draft([*PROMPT, *range(4, 12)], [1]))
    assert list(table.collect(["r"], 0.0)) == ["r"]


def test_a_draft_while_tokens_are_held_does_not_make_the_edge_wait(table, monkeypatch) -> None:
    """A probe draft for the prefix the device was told, arriving while later tokens are held:
    it cannot be used, and the device cannot draft for the current prefix until told, so the
    request stays out of the wait until the next commit tells it everything and ends the pause."""
    from vllm_tslt.edge import sessions

    table, session = table
    clock, tick = [100.0], [0.0]

    def monotonic() -> float:
        clock[0] += tick[0]
        return clock[0]

    monkeypatch.setattr(sessions.time, "monotonic", monotonic)
    table.advance("r", 4, [4])
    table.pause(session, 1)
    clock[0] += 0.01
    assert table.advance("r", 5, [5]) is None
    _store(table, session, _draft([*PROMPT, 4], [1]))  # the probe: for what it was told
    assert table.in_flight(["r"]) == {}
    tick[0], before = 0.01, clock[0]  # each clock read moves it on: a wait ends at its deadline
    assert table.collect(["r"], 0.5) == {}
    assert clock[0] - before < 0.1  # no wait (a wait would have run to 0.5)
    tick[0] = 0.0
    clock[0] += 0.001
    assert table.advance("r", 6, [6]) == (b"dev", 1, (5,))  # told at once, pause over
    req = table.requests["r"]
    assert not req.paused and not req.resuming and list(req.commit_times) == [6]
    assert "r" in table.in_flight(["r"])  # its drafts are waited for again
