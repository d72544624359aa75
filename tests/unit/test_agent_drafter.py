"""The agent's drafter on the tiny pair: rollback exactness, batching, sparsify + seeds."""

from __future__ import annotations

import pytest

from vllm_tslt.agent.drafter import CommitMismatch, Drafter, request_sparsify_config
from vllm_tslt.core.sparsify import PAD_ID, SparsifyConfig
from vllm_tslt.protocol import DecodeLimits, decode, encode, prefix_hash

pytestmark = pytest.mark.unit
TOL = 1e-5


@pytest.fixture(scope="module")
def drafter(tiny_pair):
    return Drafter(str(tiny_pair.draft), device="cpu", base=SparsifyConfig(top_k=16))


@pytest.fixture(scope="module")
def prompt(drafter):
    return drafter.tokenizer("def main(argv):\n    parser = ")["input_ids"]


def _extend(drafter, states, n):
    for _ in range(n):
        drafter.extend(states)


def _assert_like_recompute(drafter, state):
    fresh = drafter.recompute_logits(state.tokens)
    assert (drafter.peek_logits(state) - fresh).abs().max().item() < TOL


@pytest.mark.parametrize("reject_at", [0, 1, 3, 5])
def test_rollback_after_rejection_equals_fresh_recompute(drafter, prompt, reject_at):
    state = drafter.new_state("r", prompt, {"temperature": 1.0, "seed": 1})
    _extend(drafter, [state], 6)
    chain = state.chain_tokens()
    cached_before = state.cache_len
    correction = (chain[reject_at] + 1) % drafter.vocab_size
    new = (*chain[:reject_at], correction)
    assert drafter.commit(state, len(prompt) + len(new), new) == -1
    # Only the tokens after the first wrong one were dropped: KV of prompt + accepted stays.
    assert cached_before == len(prompt) + 5  # the last chain token is never fed
    assert state.cache_len == len(prompt) + reject_at
    assert state.tokens == prompt + list(new) and state.chain_len == 0
    assert state.hasher.value() == prefix_hash(state.tokens)
    _assert_like_recompute(drafter, state)
    _extend(drafter, [state], 3)  # and drafting continues from the rolled-back cache
    _assert_like_recompute(drafter, state)


def test_matching_commit_keeps_chain_and_cache(drafter, prompt):
    state = drafter.new_state("m", prompt, {"temperature": 1.0, "seed": 2})
    _extend(drafter, [state], 7)
    chain, cached = state.chain_tokens(), state.cache_len
    assert drafter.commit(state, len(prompt) + 3, tuple(chain[:3])) == 3
    assert state.chain_tokens() == chain[3:] and state.cache_len == cached
    assert len(state.chain_rows) == state.chain_len == 4
    _assert_like_recompute(drafter, state)
    with pytest.raises(CommitMismatch):
        drafter.commit(state, len(prompt) + 10, (1,))


def test_batched_steps_match_single_steps(drafter, prompt):
    params = [{"temperature": 1.0, "seed": s} for s in (1, 2, 3)]
    prompts = [prompt, prompt[:5], prompt[:9]]
    batched = [drafter.new_state(f"b{i}", p, params[i]) for i, p in enumerate(prompts)]
    calls = drafter.forward_calls
    _extend(drafter, batched, 6)
    assert drafter.forward_calls - calls == 3 + 5  # 3 prefills, then one forward per step
    for i, p in enumerate(prompts):
        single = drafter.new_state(f"s{i}", p, params[i])
        _extend(drafter, [single], 6)
        assert single.chain_tokens() == batched[i].chain_tokens()
        _assert_like_recompute(drafter, batched[i])


def test_sparsify_respects_top_k_top_p_and_seeds(drafter, prompt):
    state = drafter.new_state("k", prompt, {"temperature": 0.8, "top_k": 5, "seed": 9})
    _extend(drafter, [state], 5)
    for token, (idx, cnt) in zip(state.chain_tokens(), state.chain_rows):
        assert 1 <= idx.numel() <= 5 and token in idx.tolist()
        assert int(cnt.sum()) == 1 << 12 and bool((cnt >= 1).all())
    nucleus = drafter.new_state("p", prompt, {"temperature": 1.0, "top_p": 0.5, "seed": 9})
    _extend(drafter, [nucleus], 5)
    wide = drafter.new_state("w", prompt, {"temperature": 1.0, "seed": 9})
    _extend(drafter, [wide], 5)
    assert sum(i.numel() for i, _ in nucleus.chain_rows) < sum(i.numel() for i, _ in wide.chain_rows)
    again = drafter.new_state("k2", prompt, {"temperature": 0.8, "top_k": 5, "seed": 9})
    _extend(drafter, [again], 5)
    assert again.chain_tokens() == state.chain_tokens()  # same seed + positions -> same tokens
    other = drafter.new_state("k3", prompt, {"temperature": 0.8, "top_k": 5, "seed": 10})
    _extend(drafter, [other], 5)
    assert other.chain_tokens() != state.chain_tokens()


def test_greedy_drafts_the_argmax(drafter, prompt):
    state = drafter.new_state("g", prompt, {"temperature": 0.0})
    _extend(drafter, [state], 4)
    tokens = list(prompt)
    for t in state.chain_tokens():
        assert t == int(drafter.recompute_logits(tokens).argmax())
        tokens.append(t)
    assert all(idx.numel() == 1 for idx, _ in state.chain_rows)


def test_draft_messages_now_and_ahead(drafter, prompt):
    state = drafter.new_state("d", prompt, {"temperature": 1.0, "seed": 4}, candidates=3)
    _extend(drafter, [state], 9)
    limits = DecodeLimits(vocab_size=drafter.vocab_size)
    now = decode(encode(drafter.draft_message(state, 4)), limits)
    assert now.committed_len == len(prompt) and now.prefix_hash == prefix_hash(prompt)
    assert now.tokens.tolist() == state.chain_tokens()[:4] and now.alternatives.shape == (4, 2)
    q = now.q.dense(drafter.vocab_size)
    assert bool((q.gather(1, now.candidates()) > 0).all())  # every candidate in its support
    ahead = drafter.draft_message(state, 4, offset=5)
    expected = state.tokens[: len(prompt) + 5]
    assert ahead.committed_len == len(expected) and ahead.prefix_hash == prefix_hash(expected)
    assert ahead.tokens.tolist() == state.chain_tokens()[5:9]
    assert bool((ahead.q.indices[:, 0] != PAD_ID).all())


def test_request_params_narrow_the_agent_truncation():
    base = SparsifyConfig(top_k=32, top_p=0.95, k_max=64, quant_bits=12)
    cfg = request_sparsify_config({"temperature": 0.5, "top_k": 8, "top_p": 0.9}, base)
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.5, 8, 0.9)
    off = request_sparsify_config({"temperature": 1e-6, "top_k": 0, "top_p": 1.0}, base)
    assert off.greedy and (off.top_k, off.top_p) == (32, 0.95)


@pytest.mark.parametrize("top_p,candidates", [(None, 1), (0.9, 1), (0.9, 3)])
def test_batched_sampling_equals_one_call_per_state(drafter, top_p, candidates):
    """States sampled together get exactly the q̃ rows, tokens and alternatives that one call per
    state gives (the farm and the agent batch many requests into one sampling call)."""
    import torch

    from vllm_tslt.core.rng import position_uniforms, position_uniforms_many

    cfg = SparsifyConfig(top_k=16, top_p=top_p)
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(drafter.vocab_size, generator=gen) * 3 for _ in range(5)]
    tokens = [list(range(1, 4 + i)) for i in range(5)]

    def fresh():
        return [drafter.new_state(f"r{i}", tokens[i], {"temperature": 0.8, "seed": 100 + i},
                                  candidates=candidates) for i in range(5)]

    together, alone = fresh(), fresh()
    for s in together:
        s.sparsify = request_sparsify_config({"temperature": 0.8}, cfg)
    for s in alone:
        s.sparsify = request_sparsify_config({"temperature": 0.8}, cfg)
    drafter._sample_all(together, logits)
    for s, row in zip(alone, logits):
        drafter._sample_all([s], [row])
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens and a.chain_alts == b.chain_alts
        (ia, ca), (ib, cb) = a.chain_rows[0], b.chain_rows[0]
        assert torch.equal(ia, ib) and torch.equal(ca, cb)
    many = position_uniforms_many([7, 8, 9], [3, 0, 11], 2)
    for i, (seed, pos) in enumerate(((7, 3), (8, 0), (9, 11))):
        assert torch.equal(many[i], position_uniforms(seed, [pos], 2)[0])
