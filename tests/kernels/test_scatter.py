"""Triton scatter of sparse q̃ vs its torch reference: exact equality on irregular shapes."""

import logging

import pytest
import torch
from kernel_cases import default_device, import_kernels, sparse_rows, triton_runnable

pytestmark = pytest.mark.kernels

K = import_kernels()
DEVICE = default_device()
_ok, _why = triton_runnable(DEVICE)
needs_triton = pytest.mark.skipif(not _ok, reason=_why or "triton runnable")


def _sparse(seed: int, num_rows: int, vocab_size: int, k: int, quant_bits: int = 12,
            special_rows: bool = True):
    g = torch.Generator().manual_seed(seed)
    dist = (torch.randn(num_rows, vocab_size, generator=g) * 2).softmax(-1)
    indices, counts = sparse_rows(g, dist, k, quant_bits)
    if special_rows and num_rows > 2:
        indices[1] = -1  # an all-padding row
        counts[1] = 0
    if special_rows and num_rows > 3 and k >= 2:
        # entries at the first and last vocab ids
        indices[3, :2] = torch.tensor([0, vocab_size - 1], dtype=torch.int32)
        counts[3, :2] = torch.tensor([3, 2 ** quant_bits - 3], dtype=torch.int32)
        indices[3, 2:] = -1
        counts[3, 2:] = 0
    return indices.to(DEVICE), counts.to(DEVICE)


@needs_triton
@pytest.mark.parametrize(
    "num_rows,vocab_size,k,block_size",
    [(37, 1000, 7, 256), (5, 203, 13, 64), (1, 64, 3, 64), (9, 130, 1, 32)],
)
def test_scatter_matches_reference(num_rows, vocab_size, k, block_size):
    indices, counts = _sparse(num_rows, num_rows, vocab_size, k)
    probs = K.counts_to_probs(counts, 12)
    expected = K.scatter_sparse_q_ref(indices, probs, vocab_size)
    got = K.scatter_sparse_q(indices, probs, vocab_size, block_size=block_size)
    assert torch.equal(got, expected)
    # counts form converts inside the kernel, bit for bit the same q̃
    got_counts = K.scatter_sparse_q_counts(indices, counts, 12, vocab_size, block_size=block_size)
    assert torch.equal(got_counts, expected)
    # rows sum to exactly 1 (counts / 2**b are exact, partial sums are dyadic)
    valid_rows = (indices >= 0).any(dim=1)
    assert torch.all(expected[valid_rows].sum(dim=1) == 1.0)


@needs_triton
def test_scatter_csr_matches_padded():
    vocab_size = 333
    indices, counts = _sparse(3, 11, vocab_size, 6, quant_bits=8)
    valid = indices >= 0
    lengths = valid.sum(dim=1).to(torch.int32)
    cu = torch.zeros(indices.shape[0] + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = lengths.cumsum(0)
    flat_idx, flat_counts = indices[valid].contiguous(), counts[valid].contiguous()
    expected = K.scatter_sparse_q_ref(indices, K.counts_to_probs(counts, 8), vocab_size)
    got = K.scatter_sparse_q_csr(cu, flat_idx, flat_counts, vocab_size, quant_bits=8,
                                 block_size=128)
    assert torch.equal(got, expected)
    probs = K.counts_to_probs(flat_counts, 8)
    assert torch.equal(K.scatter_sparse_q_csr(cu, flat_idx, probs, vocab_size, block_size=64),
                       expected)
    # and the CSR -> padded helper round-trips
    pad_idx, pad_probs = K.csr_to_padded(cu, flat_idx, probs, k=indices.shape[1])
    assert torch.equal(pad_idx, indices)
    assert torch.equal(K.scatter_sparse_q_ref(pad_idx, pad_probs, vocab_size), expected)


def test_validate_sparse_q_flags_bad_rows():
    indices, counts = _sparse(4, 6, 100, 5, quant_bits=8, special_rows=False)
    ok = K.validate_sparse_q(indices, counts, 8, 100)
    assert ok.all()
    bad_i, bad_c = indices.clone(), counts.clone()
    bad_i[0, 0] = 100  # out of range
    bad_c[2, 0] += 1  # wrong total
    bad_i[4, :2] = bad_i[4, :2].flip(0)  # not ascending
    bad_c[5, 0], bad_c[5, 1] = bad_c[5, 0] + bad_c[5, 1], 0  # real entry with count 0
    ok = K.validate_sparse_q(bad_i, bad_c, 8, 100)
    assert ok.tolist() == [False, True, False, True, False, False]


def test_auto_scatter_uses_torch_on_cpu_and_logs_once(caplog):
    indices, counts = _sparse(5, 4, 50, 3, quant_bits=8)
    indices, counts = indices.cpu(), counts.cpu()
    expected = K.scatter_sparse_q_ref(indices, K.counts_to_probs(counts, 8), 50)
    K.dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger=K.dispatch.logger.name):
        for _ in range(3):
            got = K.auto_scatter_sparse_q(indices, counts, 50, quant_bits=8)
            assert torch.equal(got, expected)
    messages = [r.getMessage() for r in caplog.records if "scatter_sparse_q" in r.getMessage()]
    assert len(messages) == 1 and "torch path" in messages[0]
