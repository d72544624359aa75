"""Wire codec: round trips, bit-identical q̃, and refusal of every kind of bad frame (item 2)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tslt.core.sparsify import PAD_ID, SparseQ, SparsifyConfig, sparsify_then_sample
from vllm_tslt.protocol import (
    NO_HANDLE,
    PROTOCOL_VERSION,
    Commit,
    DecodeLimits,
    Draft,
    End,
    Error,
    Handshake,
    MsgType,
    Pause,
    PrefixHasher,
    ProtocolError,
    Reason,
    RequestStart,
    compiled,
    decode,
    encode,
    prefix_hash,
    refusal_frame,
    sparse_payload,
    vocab_fingerprint,
)
from vllm_tslt.protocol.baselines import decode_dsd, decode_tkslt, encode_dsd, encode_tkslt
from vllm_tslt.protocol.codec import pack_frame
from vllm_tslt.protocol.entropy import Decoder
from vllm_tslt.protocol.sparse_payload import pack_rows

pytestmark = pytest.mark.unit

V = 1000
LIMITS = DecodeLimits(vocab_size=V, max_k=64, max_gamma=8, max_candidates=4, max_payload_bytes=1 << 16)


def make_draft(cfg: SparsifyConfig, gamma: int = 4, m: int = 1, vocab: int = V, seed: int = 0) -> Draft:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(gamma, vocab, generator=g) * 3
    cands, q = sparsify_then_sample(logits, cfg, torch.rand(gamma, m, dtype=torch.float64, generator=g))
    return Draft(7, 321, prefix_hash(range(321)), cands[:, 0].clone(), q, cands[:, 1:].clone() if m > 1 else None)


def assert_same_draft(a: Draft, b: Draft) -> None:
    assert (a.handle, a.committed_len, a.prefix_hash) == (b.handle, b.committed_len, b.prefix_hash)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.dtype == b.tokens.dtype == torch.int64
    assert torch.equal(a.q.indices, b.q.indices) and torch.equal(a.q.counts, b.q.counts)
    assert a.q.quant_bits == b.q.quant_bits
    assert torch.equal(a.q.probs(), b.q.probs()), "q̃ must be bit-identical on both sides"
    assert (a.alternatives is None) == (b.alternatives is None)
    if a.alternatives is not None:
        assert torch.equal(a.alternatives, b.alternatives)


@pytest.mark.parametrize(
    ("cfg", "m"),
    [
        (SparsifyConfig(), 1),
        (SparsifyConfig(top_k=1), 1),
        (SparsifyConfig(temperature=0.0), 1),
        (SparsifyConfig(top_k=16, quant_bits=8), 2),
        (SparsifyConfig(top_p=0.9, quant_bits=16), 4),
        (SparsifyConfig(top_k=2, quant_bits=1), 3),
    ],
    ids=str,
)
def test_draft_round_trip(cfg: SparsifyConfig, m: int) -> None:
    draft = make_draft(cfg, m=m)
    assert_same_draft(draft, decode(encode(draft), LIMITS))
    assert_valid(decode(encode(draft), LIMITS))


@settings(max_examples=60, deadline=None)
@given(
    gamma=st.integers(1, 8), m=st.integers(1, 4), bits=st.integers(1, 16),
    k=st.integers(1, 64), vocab=st.sampled_from([2, 17, 1000, 32000, 151936]), seed=st.integers(0, 10**6),
    scale=st.floats(0.1, 10.0),
)
def test_draft_round_trip_property(gamma, m, bits, k, vocab, seed, scale) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(gamma, vocab, generator=g) * scale
    cands, q = sparsify_then_sample(logits, SparsifyConfig(top_k=k, quant_bits=bits), torch.rand(gamma, m, dtype=torch.float64, generator=g))
    draft = Draft(1, 5, 9, cands[:, 0].clone(), q, cands[:, 1:].clone() if m > 1 else None)
    limits = DecodeLimits(vocab_size=vocab, max_k=64, max_gamma=8, max_candidates=4)
    assert_same_draft(draft, decode(encode(draft), limits))
    if compiled.AVAILABLE:  # the edge's compiled decoder (151936: gaps past 16 bits, split fields)
        # ... and the compiled encoder: the numpy reference's bytes exactly
        with numpy_codec():
            reference = sparse_payload.encode_sparse_rows(q, draft.tokens, draft.alternatives)
        assert sparse_payload._encode_compiled(compiled_kernels(), q, draft.tokens,
                                               draft.alternatives) == reference
        fields = msgpack.unpackb(encode(draft))[5:]
        q, tokens, alts = sparse_payload._decode_compiled(
            compiled_kernels(), Decoder(fields[6]), *fields[:6], limits)
        assert_same_draft(draft, Draft(1, 5, 9, tokens, q, alts))


@contextlib.contextmanager
def numpy_codec():
    """Encode and decode drafts with the numpy reference (what a machine without numba runs)."""
    sparse_payload.USE_COMPILED = False
    try:
        yield
    finally:
        sparse_payload.USE_COMPILED = compiled.AVAILABLE


@pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")
def test_compiled_encode_matches_numpy() -> None:
    """The compiled encoder gives the numpy reference's bytes for valid drafts (more in the
    round-trip property test) and its ValueError, word for word, for every inconsistent one."""
    fn = compiled_kernels()
    for cfg, m in ((SparsifyConfig(top_p=0.95, quant_bits=12), 1), (SparsifyConfig(top_k=8), 3),
                   (SparsifyConfig(temperature=0.0), 1), (SparsifyConfig(top_k=64, quant_bits=16), 2)):
        d = make_draft(cfg, m=m, seed=3)
        with numpy_codec():
            reference = sparse_payload.encode_sparse_rows(d.q, d.tokens, d.alternatives)
        assert sparse_payload._encode_compiled(fn, d.q, d.tokens, d.alternatives) == reference

    def q_of(indices, counts, bits=2, dtype=torch.int32):
        return SparseQ(torch.tensor(indices, dtype=dtype), torch.tensor(counts, dtype=torch.int32), bits)

    bad = [
        (q_of([[1, -1, 3]], [[2, 0, 2]]), [1]),  # padding in the middle
        (q_of([[-1, -1]], [[0, 0]]), [1]),  # a row without an index
        (q_of([[3, 1]], [[2, 2]]), [3]),  # descending
        (q_of([[2, 2]], [[2, 2]]), [2]),  # repeated
        (q_of([[-5, 1]], [[2, 2]]), [1]),  # negative index
        (q_of([[1, 2**32]], [[2, 2]], dtype=torch.int64), [1]),  # past 2**32 - 1
        (q_of([[1, 2]], [[4, 0]]), [1]),  # a count of 0 at a valid entry
        (q_of([[1, -1]], [[3, 1]]), [1]),  # a count at padding
        (q_of([[1, 2]], [[1, 1]]), [1]),  # counts not summing to 2**b
        (q_of([[1, 2]], [[-1, 5]]), [1]),  # a negative count
        (q_of([[1, 2]], [[2, 2]]), [5]),  # a token outside its row's support
        (q_of([[1, 2], [4, -1]], [[2, 2], [4, 0]]), [1, 5]),  # ... in its second row
        (q_of([[3, -1]], [[4, 0]]), [-1]),  # PAD_ID as a token (a k = 1 row codes no column)
        (q_of([[1, 2]], [[2, 2]]), [1.0]),  # not an integer
    ]
    for q, tokens in bad:
        tokens = torch.tensor(tokens)
        with numpy_codec(), pytest.raises(ValueError) as reference:
            sparse_payload.encode_sparse_rows(q, tokens, None)
        with pytest.raises(ValueError) as got:
            sparse_payload._encode_compiled(fn, q, tokens, None)
        assert str(got.value) == str(reference.value), (q, tokens)
    # A SparseQ padded wider than its widest row codes its columns as the decoder reads them
    # (before: under a wider model, and the edge could decode another token).
    wide = SparseQ(torch.tensor([[2, 5, -1], [7, -1, -1]], dtype=torch.int32),
                   torch.tensor([[1, 1, 0], [2, 0, 0]], dtype=torch.int32), 1)
    tokens, alts = torch.tensor([5, 7]), torch.tensor([[2], [7]])
    with numpy_codec():
        reference = sparse_payload.encode_sparse_rows(wide, tokens, alts)
    assert sparse_payload._encode_compiled(fn, wide, tokens, alts) == reference
    draft = decode(encode(Draft(1, 5, 9, tokens, wide, alts)), LIMITS)
    assert draft.tokens.tolist() == [5, 7] and draft.alternatives.tolist() == [[2], [7]]
    assert draft.q.indices.tolist() == [[2, 5], [7, -1]]
    # A column-major SparseQ encodes without compiling another signature (same bytes).
    q_f = SparseQ(torch.tensor([[2, 5], [7, -1]], dtype=torch.int32).t().contiguous().t(),
                  torch.tensor([[1, 1], [2, 0]], dtype=torch.int32), 1)
    assert sparse_payload._encode_compiled(fn, q_f, tokens, alts) == \
        sparse_payload._encode_compiled(fn, SparseQ(q_f.indices.contiguous(), q_f.counts, 1),
                                        tokens, alts)


def compiled_kernels() -> dict:
    """The compiled draft decoder's kernels, compiled now (tests/unit/test_fuzz_codec.py)."""
    if not compiled._ready:
        fn = compiled.kernels()
        sparse_payload._warm_up(fn)
        compiled._ready.update(fn)
    return compiled._ready


def test_other_messages_round_trip() -> None:
    msgs = [
        Handshake(PROTOCOL_VERSION, V, "ab" * 16, "tiny-target", ("multi_candidate",), {"max_k": 64}, "s3ss10n"),
        RequestStart(1, "req-1", "sess", (1, 2, 999), {"temperature": 0.7, "seed": 3, "stop": [5, 6], "x": None}),
        Commit(1, 10, (4, 5, 6)),
        Commit(1, 10, (4, 5, 6), verified=4),
        Commit(1, 0, ()),
        End(1, "finished"),
        Error("bad_counts", "row 2", "req-1"),
    ]
    for msg in msgs:
        assert decode(encode(msg), LIMITS) == msg


def assert_valid(d: Draft) -> None:
    """Invariants every decoded draft must satisfy, whatever the bytes were."""
    idx, cnt = d.q.indices, d.q.counts
    valid = idx != PAD_ID
    assert bool((cnt.sum(1) == d.q.total).all()) and bool((cnt[valid] >= 1).all())
    assert bool((idx[valid] < LIMITS.vocab_size).all()) and bool((idx.long().diff(1)[valid[:, 1:]] > 0).all())
    assert bool((d.q.prob_of(d.candidates()) > 0).all()), "every candidate in the support"
    assert d.gamma <= LIMITS.max_gamma and int(valid.sum(1).max()) <= LIMITS.max_k


def test_random_corruption_never_gets_through() -> None:
    """Flip/insert/delete bytes of valid drafts: decode raises ProtocolError or returns a valid draft."""
    rng = random.Random(0)
    frames = [encode(make_draft(cfg, m=m, seed=s)) for s, (cfg, m) in enumerate(
        [(SparsifyConfig(top_k=16, quant_bits=8), 2), (SparsifyConfig(top_p=0.95), 1), (SparsifyConfig(temperature=0.0), 1)])]
    outcomes = {"error": 0, "valid": 0}
    for trial in range(3000):
        data = bytearray(frames[trial % len(frames)])
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.random(), rng.randrange(len(data))
            if op < 0.6:
                data[pos] ^= 1 << rng.randrange(8)
            elif op < 0.8:
                data.insert(pos, rng.randrange(256))
            elif len(data) > 1:
                del data[pos]
        try:
            assert_valid(decode(bytes(data), LIMITS))
            outcomes["valid"] += 1
        except ProtocolError:
            outcomes["error"] += 1
    assert outcomes["error"] > 1000 and outcomes["valid"] > 0, outcomes


def _reason(data: bytes, limits: DecodeLimits = LIMITS) -> Reason:
    with pytest.raises(ProtocolError) as info:
        decode(data, limits)
    return info.value.reason


def _draft_frame(fields_after_header: list, header=(1, 1, 2)) -> bytes:
    return pack_frame(MsgType.DRAFT, [*header, *fields_after_header])


def _rows(k: list[int], gaps: list[int], counts: list[int], cols: list[int], bits: int) -> list:
    """Header fields + payload of given (unchecked) field values, m = 1."""
    payload, header = pack_rows(np.array(k), np.array(gaps), np.array(counts, dtype=np.int64),
                                np.array(cols).reshape(len(k), 1), bits)
    assert header[:3] == [len(k), 1, bits]
    return [*header, payload]


def test_handcrafted_payloads() -> None:
    # One row, k = 2, indices {3, 10} (gaps 3, 6), counts (5, 11) at 4 bits, token column 1.
    good = _rows([2], [3, 6], [5], [1], 4)
    d = decode(_draft_frame(good), LIMITS)
    assert d.q.indices.tolist() == [[3, 10]] and d.q.counts.tolist() == [[5, 11]] and d.tokens.tolist() == [10]
    too_much = _rows([3], [3, 6, 1], [9, 9], [0], 4)  # last = 16 - 18 < 1
    assert _reason(_draft_frame(too_much)) == Reason.BAD_COUNTS
    bad_col = _rows([3, 2], [3, 6, 1, 0, 5], [5, 5, 8], [0, 2], 4)  # column 2 of k = 2
    assert _reason(_draft_frame(bad_col)) == Reason.NOT_IN_SUPPORT
    out_of_vocab = _rows([2], [3, 996], [5], [1], 4)  # index 1000
    assert _reason(_draft_frame(out_of_vocab)) == Reason.BAD_INDICES
    assert _reason(_draft_frame([*good[:-1], good[-1] + b"\x00"])) == Reason.BAD_BITSTREAM
    assert _reason(_draft_frame([*good[:-1], good[-1] + b"\x01\x00\x00\x00"])) in (
        Reason.BAD_BITSTREAM, Reason.BAD_COUNTS, Reason.BAD_INDICES, Reason.NOT_IN_SUPPORT)
    assert _reason(_draft_frame([*good[:-1], b"\x00\x00\x00\x00"])) == Reason.BAD_BITSTREAM
    k_big = _rows([3], [0, 0, 0], [1, 1], [0], 1)  # k = 3 > 2**1
    assert _reason(_draft_frame(k_big)) == Reason.TOO_LARGE
    wrong_alphabet = [*good[:4], 2, *good[5:]]  # gap buckets up to 3 declared as < 2
    assert decode_or_reason(_draft_frame(wrong_alphabet)) != d


def decode_or_reason(data: bytes):
    try:
        return decode(data, LIMITS)
    except ProtocolError as e:
        return e.reason


def test_golden_bytes() -> None:
    """The exact bytes of fixed drafts: a change here is a wire-format change (protocol version),
    e.g. a constriction release that quantizes models differently (the pin in pyproject.toml)."""
    frames = [encode(make_draft(cfg, m=m, seed=1)) for cfg, m in (
        (SparsifyConfig(top_p=0.95, quant_bits=12), 1), (SparsifyConfig(top_k=8, quant_bits=16), 3),
        (SparsifyConfig(temperature=0.0), 1))]
    digest = hashlib.sha256(b"".join(frames)).hexdigest()[:16]
    assert [len(f) for f in frames] == GOLDEN_SIZES and digest == GOLDEN_DIGEST, (
        [len(f) for f in frames], digest)


GOLDEN_SIZES = [433, 116, 32]
GOLDEN_DIGEST = "aae0a66c5dbdf174"  # protocol 3 (the version byte)


def test_refusals_by_reason() -> None:
    draft = encode(make_draft(SparsifyConfig(top_k=8)))
    frame = msgpack.unpackb(draft)
    repack = lambda f: msgpack.packb(f, use_bin_type=True)  # noqa: E731
    assert _reason(repack([PROTOCOL_VERSION - 1, *frame[1:]])) == Reason.BAD_VERSION
    assert _reason(repack([PROTOCOL_VERSION + 1, *frame[1:]])) == Reason.BAD_VERSION
    assert _reason(repack([frame[0], 99, *frame[2:]])) == Reason.BAD_TYPE
    # A TSLT body under a baseline's type does not parse as that baseline.
    assert _reason(repack([frame[0], int(MsgType.DSD_DRAFT), *frame[2:]])) != Reason.BAD_TYPE
    assert _reason(repack(frame[:-1])) == Reason.MALFORMED
    assert _reason(repack([*frame[:2], "7", *frame[3:]])) == Reason.MALFORMED  # handle not an int
    assert _reason(repack([*frame[:5], 9, *frame[6:]])) == Reason.OUT_OF_RANGE  # gamma > max_gamma
    assert _reason(repack([*frame[:7], 17, *frame[8:]])) == Reason.OUT_OF_RANGE  # quant_bits
    assert _reason(repack([*frame[:3], -1, *frame[4:]])) == Reason.OUT_OF_RANGE  # committed_len
    assert _reason(b"\xc1") == Reason.MALFORMED
    assert _reason(draft + b"\x00") == Reason.MALFORMED
    assert _reason(b"") == Reason.MALFORMED
    assert _reason(msgpack.packb(msgpack.ExtType(1, b"x"))) == Reason.MALFORMED
    assert _reason(draft, DecodeLimits(vocab_size=V, max_payload_bytes=10)) == Reason.TOO_LARGE
    wide = encode(make_draft(SparsifyConfig(top_k=64)))
    assert _reason(wide, DecodeLimits(vocab_size=V, max_k=32)) == Reason.TOO_LARGE
    assert _reason(encode(Commit(1, 3, (1, 2, V)))) == Reason.OUT_OF_RANGE
    assert _reason(encode(Commit(1, 1, (1, 2)))) == Reason.OUT_OF_RANGE  # committed_len < new
    assert _reason(pack_frame(MsgType.COMMIT, [1, 3, b"\x00" * 5, 0])) == Reason.MALFORMED
    # protocol 3: a commit says how many draft tokens were verified; v2's 3-field commit is refused
    assert _reason(pack_frame(MsgType.COMMIT, [1, 3, b"\x00" * 4])) == Reason.MALFORMED
    assert _reason(pack_frame(MsgType.COMMIT, [1, 3, b"\x00" * 4, -1])) == Reason.OUT_OF_RANGE
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="verified"):
            encode(Commit(1, 3, (1,), verified=bad))
    big_prompt = encode(RequestStart(1, "r", "s", tuple(range(100)), {}))
    assert _reason(big_prompt, DecodeLimits(vocab_size=V, max_prompt_len=99)) == Reason.TOO_LARGE
    nan = pack_frame(MsgType.REQUEST_START, [1, "r", "s", b"", {"temperature": math.nan}])
    assert _reason(nan) == Reason.NON_FINITE
    nested = pack_frame(MsgType.REQUEST_START, [1, "r", "s", b"", {"a": {"b": 1}}])
    assert _reason(nested) == Reason.MALFORMED
    assert _reason(pack_frame(MsgType.HANDSHAKE, [V, "f", "m", [1], {}])) == Reason.MALFORMED
    with pytest.raises(ProtocolError) as info:
        decode(b"\xc1", LIMITS)
    assert isinstance(info.value, ValueError) and info.value.reason.value == "malformed"


def test_encode_refuses_inconsistent_drafts() -> None:
    d = make_draft(SparsifyConfig(top_k=4))
    outside = next(i for i in range(V) if i not in d.q.indices[0].tolist())
    with pytest.raises(ValueError, match="support"):
        encode(Draft(1, 1, 1, torch.tensor([outside, *d.tokens[1:].tolist()]), d.q))
    unsorted = SparseQ(d.q.indices.flip(1).contiguous(), d.q.counts.flip(1).contiguous(), d.q.quant_bits)
    with pytest.raises(ValueError, match="ascending"):
        encode(Draft(1, 1, 1, d.tokens, unsorted))
    bad_sum = SparseQ(d.q.indices, d.q.counts + 1, d.q.quant_bits)
    with pytest.raises(ValueError, match="counts"):
        encode(Draft(1, 1, 1, d.tokens, bad_sum))
    with pytest.raises(ValueError, match="protocol"):
        encode(Handshake(PROTOCOL_VERSION + 1, V, "f", "m"))
    with pytest.raises(ValueError, match="finite"):
        encode(RequestStart(1, "r", "s", (), {"t": math.inf}))


def test_payload_is_compact() -> None:
    """TSLT top-16 at 8 bits over V = 32000 costs well under 1% of DSD fp16 per draft token."""
    d = make_draft(SparsifyConfig(top_k=16, quant_bits=8), gamma=4, vocab=32000)
    tslt = len(encode(d)) / 4
    probs = torch.softmax(torch.randn(4, 32000), -1)
    dsd16 = len(encode_dsd(7, 321, 1, d.tokens, probs, "fp16")) / 4
    assert dsd16 > 64000 and tslt < 0.01 * dsd16 and tslt < 64, (tslt, dsd16)


def test_baselines_round_trip() -> None:
    limits = DecodeLimits(vocab_size=V, max_payload_bytes=1 << 20)
    probs = torch.softmax(torch.randn(4, V), -1)
    tokens = torch.tensor([1, 2, 3, 4])
    for dtype, size, tol in (("fp32", 4, 0.0), ("fp16", 2, 1e-3)):
        data = encode_dsd(1, 1, 2, tokens, probs, dtype)
        assert 4 * V * size < len(data) < 4 * V * size + 64
        got_tokens, got = decode_dsd(data, limits)
        assert torch.equal(got_tokens, tokens) and torch.allclose(got, probs, atol=tol, rtol=tol)
    data = encode_tkslt(1, 1, 2, tokens, probs, top_k=16)
    assert 4 * 16 * 6 < len(data) < 4 * 16 * 6 + 64
    got_tokens, values, indices = decode_tkslt(data, limits)
    assert torch.equal(indices, torch.topk(probs, 16).indices) and torch.equal(got_tokens, tokens)
    assert torch.allclose(values, torch.topk(probs, 16).values, rtol=1e-3)
    bad = encode_dsd(1, 1, 2, tokens, torch.full((4, V), float("nan")), "fp16")
    with pytest.raises(ProtocolError) as info:
        decode_dsd(bad, limits)
    assert info.value.reason == Reason.NON_FINITE
    with pytest.raises(ProtocolError):
        decode_tkslt(encode_dsd(1, 1, 2, tokens, probs, "fp16"), limits)


def test_vocab_fingerprint_and_prefix_hash() -> None:
    vocab = {"a": 0, "b": 1, "<s>": 2}
    fp = vocab_fingerprint(vocab)
    assert fp == vocab_fingerprint(dict(reversed(list(vocab.items())))) and len(fp) == 32
    assert fp != vocab_fingerprint({"a": 0, "b": 2, "<s>": 1})
    assert fp != vocab_fingerprint({"a": 0, "b": 1, "<s>": 2, "c": 3})
    assert vocab_fingerprint({"ab": 0, "c": 1}) != vocab_fingerprint({"a": 0, "bc": 1})
    hasher = PrefixHasher([5, 6])
    hasher.update(torch.tensor([7]))
    assert hasher.value() == prefix_hash([5, 6, 7]) != prefix_hash([5, 6, 8]) and hasher.length == 3
    assert 0 <= prefix_hash([]) < 2**32


def test_an_old_version_is_refused_in_words_it_can_read() -> None:
    """A v1 peer's handshake is refused (BAD_VERSION naming both versions), and the refusal frame
    carries the peer's version number with Error's version-independent layout."""
    old_hello = msgpack.packb([1, int(MsgType.HANDSHAKE), V, "f" * 32, "draft", [], {}, ""])
    with pytest.raises(ProtocolError) as info:
        decode(old_hello, LIMITS)
    assert info.value.reason == Reason.BAD_VERSION
    assert "version 1" in str(info.value) and f"version {PROTOCOL_VERSION}" in str(info.value)
    frame = msgpack.unpackb(refusal_frame(old_hello, "bad_version", str(info.value)))
    assert frame[:3] == [1, int(MsgType.ERROR), "bad_version"] and len(frame) == 5
    ours = refusal_frame(b"\xc1", "bad_version", "?")  # unreadable: our own version
    assert decode(ours, LIMITS) == Error("bad_version", "?", "")


def test_handles_are_small_on_the_wire() -> None:
    """A request handle < 128 costs one byte in a frame; handle 0 only names a session (End)."""
    short = encode(Commit(5, 10, (4,)))
    assert len(short) == len(encode(Commit(127, 10, (4,)))) == len(encode(Commit(128, 10, (4,)))) - 1
    assert decode(encode(End(NO_HANDLE, "bye")), LIMITS) == End(0, "bye")
    for bad in (Commit(0, 1, ()), Pause(0), Commit(2**32, 1, ())):
        with pytest.raises(ValueError, match="handle"):
            encode(bad)
    assert _reason(pack_frame(MsgType.PAUSE, [0])) == Reason.OUT_OF_RANGE
