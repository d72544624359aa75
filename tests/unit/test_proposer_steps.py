"""The proxy's per-step bookkeeping, driven the way vLLM 0.32's model runner drives it.

Each test runs the real `TsltProposer` (real hub on a free loopback port, no device) with the
model runner replaced by the few attributes the proxy reads, and calls its hooks in vLLM's order:
`begin_step` (start of every step) -> `draft_probs` (drafts scheduled this step) -> `propose`
(drafts for the next step).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_tslt.core.sparsify import SparseQ
from vllm_tslt.protocol import Draft

pytestmark = pytest.mark.unit

VOCAB = 64


@pytest.fixture()
def proposer(monkeypatch, tmp_path):
    from vllm_tslt.edge import proposer as proposer_module

    monkeypatch.setattr(proposer_module, "_tokenizer_fingerprint", lambda _: "f" * 32)
    config = SimpleNamespace(
        additional_config={"tslt": {"bind": "tcp://127.0.0.1:0",
                                    "stats_path": str(tmp_path / "stats.json")}},
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB, served_model_name=None,
                                     model="m", tokenizer="unused", trust_remote_code=False))
    prop = proposer_module.TsltProposer(config)
    prop._commit = lambda *args: True  # every request is bound and wants a draft
    yield prop
    prop.stats.close()
    prop.hub.close()


def _draft(rid: str, tokens: list[int]) -> Draft:
    n = len(tokens)
    # q̃ = 1/2 on the drafted token, 1/2 on token 63: not one-hot, so a use is visible.
    indices = torch.tensor([[t, 63] for t in tokens], dtype=torch.int32)
    q = SparseQ(indices, torch.full((n, 2), 2048, dtype=torch.int32), 12)
    return Draft(rid, 10, 0, torch.tensor(tokens), q)


def _run_step(prop, req_ids, scheduled=None, drafts=None):
    """One engine step: begin, verify `scheduled` ({rid: tokens}), then propose `drafts`."""
    prop.begin_step([])
    dense = None
    if scheduled is not None:
        counts = [len(scheduled.get(rid, [])) for rid in req_ids]
        flat = [t for rid in req_ids for t in scheduled.get(rid, [])]
        metadata = SimpleNamespace(draft_token_ids=torch.tensor(flat, dtype=torch.int32),
                                   num_draft_tokens=counts)
        dense = prop.draft_probs(req_ids, metadata, torch.device("cpu"))
    if drafts is not None:
        prop.hub.collect = lambda ids, deadline, **_: {rid: drafts[rid] for rid in ids if rid in drafts}
        runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(req_ids)))
        prop.bind_step(runner, None)
        out = prop.propose([[1]] * len(req_ids), [10] * len(req_ids), None)
        assert out == [drafts[rid].tokens.tolist() if rid in drafts else [] for rid in req_ids]
    return dense


def _is_one_hot(row: torch.Tensor, token: int) -> bool:
    return float(row[token]) == 1.0 and float(row.sum()) == 1.0


def test_drafts_of_the_previous_step_are_verified_with_their_q(proposer):
    _run_step(proposer, ["r"], drafts={"r": _draft("r", [0, 5, 7, 9])})
    dense = _run_step(proposer, ["r"], scheduled={"r": [0, 5]})
    assert dense.shape == (2, VOCAB)
    assert float(dense[0, 0]) == 0.5 and float(dense[0, 63]) == 0.5


def test_a_stale_draft_never_verifies_tokens_it_did_not_produce(proposer):
    """Issue 18 item 2: step 1 proposes [0, 5, 7, 9]; step 2 schedules no draft for the request
    (token budget) and the drafter is skipped (near max_model_len), so step 3 verifies the zeros
    vLLM schedules for a skipped drafter. Those must get one-hot rows, not the old draft's q̃."""
    _run_step(proposer, ["r"], drafts={"r": _draft("r", [0, 5, 7, 9])})
    _run_step(proposer, ["r"], scheduled={"r": []})  # nothing scheduled, drafter skipped
    dense = _run_step(proposer, ["r"], scheduled={"r": [0]})
    assert _is_one_hot(dense[0], 0), dense[0, [0, 63]]


def test_a_draft_is_used_in_the_next_step_only(proposer):
    _run_step(proposer, ["r", "s"], drafts={"r": _draft("r", [3, 4]), "s": _draft("s", [8])})
    _run_step(proposer, ["r", "s"])  # a step with no speculative tokens at all
    dense = _run_step(proposer, ["r", "s"], scheduled={"r": [3, 4], "s": [8]})
    assert all(_is_one_hot(dense[i], t) for i, t in enumerate([3, 4, 8]))


def test_one_hot_cut_mode_verifies_every_structured_draft_with_one_hot_rows(proposer):
    """Cut or not: whether a grammar cuts a draft depends on its values, so the choice of rows
    must not (q̃ rows for uncut drafts only would be biased)."""
    _run_step(proposer, ["r", "s"], drafts={"r": _draft("r", [3, 4, 5, 6]),
                                             "s": _draft("s", [7, 8])})
    proposer._cut_mode["r"] = "one_hot"
    dense = _run_step(proposer, ["r", "s"], scheduled={"r": [3, 4], "s": [7, 8]})
    assert _is_one_hot(dense[0], 3) and _is_one_hot(dense[1], 4)  # cut where a token was invalid
    assert float(dense[2, 63]) == 0.5  # an unconstrained neighbour keeps its q̃
    _run_step(proposer, ["r"], drafts={"r": _draft("r", [3, 4])})
    dense = _run_step(proposer, ["r"], scheduled={"r": [3, 4]})  # not cut: one-hot as well
    assert _is_one_hot(dense[0], 3) and _is_one_hot(dense[1], 4)


# --- patches/structured.py helpers (no vLLM engine needed) --------------------------------------


def test_keep_first_invalid():
    from vllm_tslt.patches.structured import keep_first_invalid

    assert keep_first_invalid([5, 6, 7, 8], [5, 6]) == [5, 6, 7]
    assert keep_first_invalid([5, 6, 7, 8], []) == [5]
    assert keep_first_invalid([5, 6], [5, 6]) == [5, 6]
    assert keep_first_invalid([5, -1, 7], [5]) == [5]  # vLLM's padding is never kept
    assert keep_first_invalid([5, 6, 7], [9]) == [9]  # not a prefix: leave vLLM's answer


def test_cut_mode_by_backend_and_test_switch(monkeypatch):
    from vllm_tslt.patches.structured import TEST_CUT_KEY, cut_mode

    def params(backend, extra=None):
        so = None if backend is None else SimpleNamespace(_backend=backend)
        return SimpleNamespace(structured_outputs=so, extra_args=extra)

    monkeypatch.delenv("VLLM_TSLT_TEST_SWITCHES", raising=False)
    assert cut_mode(params(None)) == "none"
    assert cut_mode(params("xgrammar")) == "reject_slot"
    assert cut_mode(params("guidance")) == "one_hot"
    forced = params("xgrammar", {TEST_CUT_KEY: "truncate"})
    assert cut_mode(forced) == "reject_slot"  # switches are off on a normal server
    monkeypatch.setenv("VLLM_TSLT_TEST_SWITCHES", "1")
    assert cut_mode(forced) == "truncate"
    assert cut_mode(params("xgrammar", {TEST_CUT_KEY: "bogus"})) == "reject_slot"


def test_expected_rejection_records_are_dropped_once_and_others_kept():
    import logging

    from vllm_tslt.patches.structured import EXPECTED_REJECT_MESSAGES, ExpectedRejections

    filt = ExpectedRejections()
    fill_msg = EXPECTED_REJECT_MESSAGES["vllm.v1.structured_output"]
    fsm_msg = EXPECTED_REJECT_MESSAGES["vllm.v1.structured_output.backend_xgrammar"]

    def record(msg, args):
        return logging.LogRecord("vllm", logging.ERROR, __file__, 1, msg, args, None)

    filt.expect("req-1", 42)
    assert not filt.filter(record(fill_msg, (42, "req-1")))
    assert not filt.filter(record(fsm_msg, ("req-1", 42)))
    assert filt.filter(record(fill_msg, (42, "req-1")))  # consumed: a second one is real
    assert filt.filter(record(fill_msg, (43, "req-1")))  # a token we did not keep
    assert filt.filter(record("something else %s", ("x",)))


def test_drafts_are_capped_while_a_request_is_short_of_min_tokens(proposer):
    """docs/exactness.md note 11: the bonus after n drafts is output L + n; vLLM masks its stop
    tokens whenever L < min_tokens, so the proxy hands out n <= min_tokens - L - 1."""
    proposer._min_tokens["r"] = (8, 5)  # prompt of 8 tokens, min_tokens = 5
    draft = _draft("r", [3, 4, 5, 6])
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["r"]))
    proposer.hub.collect = lambda ids, deadline, **_: {"r": draft}
    proposer.bind_step(runner, None)
    handed = [proposer.propose([[1]], [length], None)[0] for length in (9, 10, 11, 12, 13, 14)]
    # outputs L = 1..6: caps 3, 2, 1, 0, then no cap (L >= 5)
    assert [len(t) for t in handed] == [3, 2, 1, 0, 4, 4]
    assert "r" not in proposer._min_tokens


def test_fused_noise_rows_only_for_drafted_requests():
    """The fused verifier draws Exp(1) rows only for requests with drafts (the only rows it
    reads); a seeded request's row is its generator's next draw, as in vLLM."""
    from vllm_tslt.edge.verify import _exponential_noise

    seeded = torch.Generator().manual_seed(7)
    meta = SimpleNamespace(generators={1: seeded, 2: torch.Generator().manual_seed(8)})
    q = _exponential_noise([0, 3, 0, 2], 16, meta, torch.device("cpu"), torch.float32)
    expected = torch.empty(16).exponential_(generator=torch.Generator().manual_seed(7))
    assert torch.equal(q[1], expected)  # seeded and drafted: vLLM's stream
    assert torch.all(q[0] == 1) and torch.all(q[2] == 1)  # undrafted: never read, not drawn
    assert torch.all(q[3] > 0) and not torch.all(q[3] == 1)  # unseeded, drafted: Exp(1)
    assert meta.generators[2].initial_seed() == 8 and torch.equal(  # request 2's stream untouched
        torch.rand(1, generator=meta.generators[2]),
        torch.rand(1, generator=torch.Generator().manual_seed(8)))


def test_a_parked_request_gets_its_draft_through_the_extras_and_verifies_with_its_q(proposer):
    """Intake (edge/intake.py): step 1 parks "a" (its draft is 8 ms away, a step is 10 ms, "b"
    keeps the batch busy); step 2 runs without "a", its draft comes and is handed to the
    scheduler as an extra; step 3 verifies it with its own q̃."""
    from vllm_tslt.edge.intake import Intake

    proposer.intake = intake = Intake("adaptive", 0.2, max_park_steps=2)
    intake._step.add(0.010)
    intake.observe("a", 4)
    proposer._committed.update(a=10, b=10)
    draft_a, draft_b = _draft("a", [3, 4, 5]), _draft("b", [6])
    arrived = {"b": draft_b}
    proposer.hub.in_flight = lambda ids: {rid: 0.008 for rid in ids if rid not in arrived}
    proposer.hub.collect = lambda ids, deadline, **_: {r: arrived[r] for r in ids if r in arrived}

    def propose(req_ids):
        proposer.begin_step([])
        intake._end = None  # keep the step time at 10 ms (this test takes no time)
        proposer.bind_step(SimpleNamespace(input_batch=SimpleNamespace(req_ids=req_ids)), None)
        return proposer.propose([[1]] * len(req_ids), [10] * len(req_ids), None)

    assert propose(["a", "b"]) == [[], [6]]
    assert proposer.take_scheduler_extras() == ({}, ["a"])
    assert proposer.take_scheduler_extras() == ({}, [])  # taken once
    arrived["a"] = draft_a
    assert propose(["b"]) == [[6]]  # "a" is parked: not in the batch
    assert proposer.take_scheduler_extras() == ({"a": [3, 4, 5]}, [])
    proposer.begin_step([])
    metadata = SimpleNamespace(draft_token_ids=torch.tensor([6, 3, 4, 5], dtype=torch.int32),
                               num_draft_tokens=[1, 3])
    dense = proposer.draft_probs(["b", "a"], metadata, torch.device("cpu"))
    assert all(float(dense[i, t]) == 0.5 for i, t in enumerate([6, 3, 4, 5]))  # their q̃
    snap = proposer.hub.snapshot()
    assert snap["intake_parks"] == 1 and "intake_plain" not in snap


def test_verified_rounds_add_their_moments_for_the_acceptance_interval(proposer):
    """Each verified round adds d (draft tokens vLLM verified: its scheduler output) and a
    (accepted = emitted - 1) to the hub's moments Σ1, Σd, Σa, Σa², Σad, Σd² (vllm_tslt_round_*
    on /metrics), and its commit tells the device d (Commit.verified)."""
    _run_step(proposer, ["r", "s"], drafts={"r": _draft("r", [0, 5, 7, 9]), "s": _draft("s", [3])})
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["r", "s"]))
    proposer.hub.collect = lambda ids, deadline, **_: {}
    commits = []
    proposer._commit = lambda _runner, rid, *args: commits.append(proposer._verified.get(rid, 0))
    proposer.begin_step([])
    proposer.bind_step(runner, SimpleNamespace(scheduled_spec_decode_tokens={"r": [0, 5, 7, 9],
                                                                              "s": [3]}))
    proposer.propose([[0, 5, 2], [3, 8]], [10, 10], None)  # r: 2 accepted of 4, s: 1 of 1
    assert commits == [4, 1]
    snap = proposer.hub.snapshot()
    assert {k: snap[k] for k in ("verify_rounds", "round_draft_tokens", "round_accepted",
                                 "round_accepted_sq", "round_accepted_x_draft",
                                 "round_draft_sq")} == {
        "verify_rounds": 2, "round_draft_tokens": 5, "round_accepted": 3,
        "round_accepted_sq": 5, "round_accepted_x_draft": 9, "round_draft_sq": 17}


def test_a_draft_vllm_cut_counts_as_the_tokens_it_verified(proposer):
    """vLLM may verify fewer draft tokens than were handed out (token budget, max_model_len,
    grammar): the round and the commit count what it verified, so all-accepted stays a round
    without a rejection (before, the handed-out length made it look like one)."""
    _run_step(proposer, ["r"], drafts={"r": _draft("r", [0, 5, 7, 9])})
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["r"]))
    proposer.hub.collect = lambda ids, deadline, **_: {}
    commits = []
    proposer._commit = lambda _runner, rid, *args: commits.append(proposer._verified.get(rid, 0))
    proposer.begin_step([])
    proposer.bind_step(runner, SimpleNamespace(scheduled_spec_decode_tokens={"r": [0, 5]}))
    proposer.propose([[0, 5, 2]], [10], None)  # both verified tokens accepted, then a bonus
    snap = proposer.hub.snapshot()
    assert commits == [2]
    assert (snap["verify_rounds"], snap["round_draft_tokens"], snap["round_accepted"]) == (1, 2, 2)
    # A plain step (vLLM scheduled no draft tokens for r) is no round and commits 0.
    proposer.begin_step([])
    proposer.bind_step(runner, SimpleNamespace(scheduled_spec_decode_tokens={}))
    proposer.propose([[4]], [11], None)
    assert commits == [2, 0] and proposer.hub.snapshot()["verify_rounds"] == 1
