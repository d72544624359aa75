"""Baseline wire formats (DSD fp32/fp16, TK-SLT) as real drafts: the device samples from the q̂ the
edge will verify against, and the codec refuses what would break that."""

from __future__ import annotations

import msgpack
import pytest
import torch
from scipy.stats import chisquare

from vllm_tslt.core.float_q import (
    FloatQ,
    baseline_then_sample,
    concat_rows,
    normalise_rows,
    sample_from_float,
)
from vllm_tslt.core.sparsify import SparseQ, SparsifyConfig, sparsify
from vllm_tslt.protocol import (
    DecodeLimits,
    Draft,
    EdgeStatus,
    ProtocolError,
    Reason,
    decode,
    encode,
)

pytestmark = pytest.mark.unit
V = 256


def _logits(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("wire", ["dsd-fp32", "dsd-fp16", "tkslt"])
def test_round_trip_gives_the_edge_the_devices_distribution(wire: str) -> None:
    tokens, q = baseline_then_sample(_logits(), SparsifyConfig(), wire, 16,
                                     torch.rand(4, dtype=torch.float64))
    got = decode(encode(Draft(1, 9, 3, tokens, q)), DecodeLimits(vocab_size=V))
    assert isinstance(got.q, FloatQ) and got.q.wire == wire
    assert torch.equal(got.tokens, tokens)
    assert torch.equal(got.q.probs(), q.probs())  # bit-identical: the same formula on the same bytes
    assert (got.q.prob_of(tokens.view(-1, 1)) > 0).all()
    width = 16 if wire == "tkslt" else V
    assert got.q.indices.shape == (4, width)
    assert (got.q.indices[:, 1:] > got.q.indices[:, :-1]).all()  # ascending


def _chi_square_p(q: FloatQ, draws: torch.Tensor) -> float:
    idx = q.indices[0].long()
    observed = torch.stack([(draws == i).sum() for i in idx]).double()
    assert int(observed.sum()) == draws.numel()  # every draw is in the support
    expected = q.probs()[0].double() * draws.numel()
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def test_sampling_follows_q_hat() -> None:
    """200k draws from a TK-SLT row: chi-square p > 1e-4 against q̂, never a zero-mass token; a
    deliberately wrong sampler (from q̂ sharpened to q̂², a plausible temperature slip) is rejected
    by the same test."""
    _, q = baseline_then_sample(_logits(1, seed=3), SparsifyConfig(), "tkslt", 8,
                                torch.rand(1, dtype=torch.float64))
    u = torch.rand(1, 200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _chi_square_p(q, sample_from_float(q, u)[0]) > 1e-4
    wrong = FloatQ(q.indices, q.probs() ** 2, "tkslt")
    assert _chi_square_p(q, sample_from_float(wrong, u)[0]) < 1e-10


def test_zero_mass_tokens_are_never_drawn() -> None:
    q = FloatQ(torch.tensor([[0, 1, 2, 3]], dtype=torch.int32),
               torch.tensor([[0.0, 0.5, 0.0, 0.5]]), "dsd-fp32")
    u = torch.tensor([[0.0, 0.25, 0.4999999, 0.5, 0.75, 0.9999999999]], dtype=torch.float64)
    assert set(sample_from_float(q, u)[0].tolist()) <= {1, 3}


def test_greedy_baseline_is_the_argmax() -> None:
    logits = _logits()
    tokens, q = baseline_then_sample(logits, SparsifyConfig(temperature=0.0), "dsd-fp16", 1,
                                     torch.rand(4, dtype=torch.float64))
    assert torch.equal(tokens, logits.argmax(1))
    assert torch.equal(q.prob_of(tokens.view(-1, 1)).view(-1), torch.ones(4))


def test_concat_mixes_integer_and_float_rows_exactly() -> None:
    sq = sparsify(_logits(2, seed=5), SparsifyConfig(top_k=8))
    _, fq = baseline_then_sample(_logits(3, seed=6), SparsifyConfig(), "tkslt", 4,
                                 torch.rand(3, dtype=torch.float64))
    both = concat_rows([sq, fq])
    assert isinstance(both, FloatQ) and both.num_tokens == 5
    assert torch.equal(both.dense(V)[:2], sq.dense(V))
    assert torch.equal(both.dense(V)[2:], fq.dense(V))
    assert isinstance(concat_rows([sq, sq]), SparseQ)


def test_refusals() -> None:
    limits = DecodeLimits(vocab_size=V)
    tokens, q = baseline_then_sample(_logits(), SparsifyConfig(), "tkslt", 4,
                                     torch.rand(4, dtype=torch.float64))
    frame = msgpack.unpackb(encode(Draft(1, 1, 1, tokens, q)))
    repack = lambda f: msgpack.packb(f, use_bin_type=True)  # noqa: E731

    def reason(data: bytes) -> Reason:
        with pytest.raises(ProtocolError) as info:
            decode(data, limits)
        return info.value.reason

    # A draft token outside the sent top-K.
    outside = next(t for t in range(V) if t not in q.indices[0].tolist())
    bad_tokens = tokens.clone()
    bad_tokens[0] = outside
    assert reason(encode(Draft(1, 1, 1, bad_tokens, q))) == Reason.NOT_IN_SUPPORT
    # Duplicate indices in a row.
    dup = q.indices.clone()
    dup[:, 1] = dup[:, 0]
    assert reason(encode(Draft(1, 1, 1, tokens, FloatQ(dup, q.values, "tkslt")))) in (
        Reason.BAD_INDICES, Reason.NOT_IN_SUPPORT)
    # A row with no mass.
    zero = q.values.clone()
    zero[2] = 0
    assert reason(encode(Draft(1, 1, 1, tokens, FloatQ(q.indices, zero, "tkslt")))) == \
        Reason.BAD_COUNTS
    assert reason(repack([*frame[:6], 10_000, *frame[7:]])) == Reason.OUT_OF_RANGE  # K > max_k
    with pytest.raises(ValueError, match="alternatives"):
        encode(Draft(1, 1, 1, tokens, q, torch.zeros(4, 1, dtype=torch.int64)))


def test_normalise_is_the_shared_formula() -> None:
    v = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]])
    assert torch.equal(normalise_rows(v), torch.tensor([[0.25, 0.75, 0.0], [0.25, 0.25, 0.5]]))


def test_edge_status_round_trip_and_refusals() -> None:
    limits = DecodeLimits(vocab_size=V)
    assert decode(encode(EdgeStatus(12.5, 0.75, 3)), limits) == EdgeStatus(12.5, 0.75, 3)
    base = msgpack.unpackb(encode(EdgeStatus(1.0, 1.0, 1)))
    for bad, why in (([*base[:2], float("nan"), *base[3:]], Reason.NON_FINITE),
                     ([*base[:2], -1.0, *base[3:]], Reason.OUT_OF_RANGE),
                     ([*base[:3], "x", *base[4:]], Reason.MALFORMED),
                     ([*base[:4], -2], Reason.OUT_OF_RANGE)):
        with pytest.raises(ProtocolError) as info:
            decode(msgpack.packb(bad, use_bin_type=True), limits)
        assert info.value.reason == why


def test_normalised_rows_are_exact_integer_masses_summing_to_one():
    """Issue 18 item 5: device and edge use bit-identical q̂ (one definition, no 1e-7 drift)."""
    from vllm_tslt.core.float_q import MASS_BITS, normalise_rows

    g = torch.Generator().manual_seed(3)
    values = torch.rand(64, 257, generator=g) ** 6  # skewed, like softmax rows
    values[0, 5:] = 0.0
    values[1] = torch.tensor([1e-12] + [1.0] * 256)  # a tiny entry: may round to 0
    values = values.to(torch.float16).to(torch.float32)  # wire-rounded, as dsd-fp16 sends
    q = normalise_rows(values)
    counts = q.to(torch.float64) * (1 << MASS_BITS)
    assert torch.equal(counts, counts.round())  # integer masses
    assert torch.all(counts.sum(dim=1) == (1 << MASS_BITS))  # exactly 1 in float64 ...
    assert torch.all(q.sum(dim=1, dtype=torch.float64) == 1.0)  # ... from the float32 values
    assert torch.all((q > 0) <= (values > 0))  # no mass appears where none was sent
    exact = values.to(torch.float64) / values.to(torch.float64).sum(1, keepdim=True)
    assert float((q.to(torch.float64) - exact).abs().max()) <= 2.0 ** -MASS_BITS
    assert torch.equal(normalise_rows(values), q)  # deterministic
    assert torch.equal(normalise_rows(torch.zeros(2, 4)), torch.zeros(2, 4))
