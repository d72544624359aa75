"""Scatter sparse draft distributions q̃ into the dense tensor vLLM's rejection sampler consumes.

Sparse q̃ for `num_tokens` draft rows comes in one of two layouts:

* padded: `indices [num_tokens, k] int32`, sorted ascending per row, padded with -1 at the end,
  with `probs [num_tokens, k] float32` (0 at padding) or integer `counts [num_tokens, k]`
  (0 at padding, Σ counts per row == 2**quant_bits, q̃(x) = counts / 2**quant_bits);
* CSR: `cu_offsets [num_tokens + 1]`, flat `indices [nnz]` and flat `probs`/`counts [nnz]`.

Output: `draft_probs [num_tokens, vocab_size] float32`, q̃ at the indices and 0 elsewhere — the
`draft_probs` argument of `vllm.v1.sample.rejection_sampler.rejection_sample`.

NOTE: counts → probability is `counts * 2**-quant_bits` in fp32, which is exact for counts below
2**24 (quant_bits <= 16 here); the torch reference divides by 2**quant_bits, which is the same
number bit for bit, so kernel and reference agree exactly.

Kernel layout: one program per (row, vocab block). It stores zeros over its block, waits at a
barrier, then stores the row's sparse entries that fall inside the block. Every byte of the
output is written once (plus K entries twice), and the row's sparse entries are read once per
vocab block (K * 8 bytes, negligible next to the BLOCK_SIZE * 4 bytes written).
"""

import torch

from ._triton_compat import next_power_of_2, tl, triton

# Vocab block per program. 4096 fp32 = 16 KiB of stores per program.
SCATTER_BLOCK_SIZE = 4096


@triton.jit
def scatter_sparse_q_kernel(
    out_ptr,  # [num_tokens, vocab_size] float32
    row_start_ptr,  # [num_tokens + 1] int32 (CSR) or unused (padded)
    indices_ptr,  # [num_tokens, k] (padded) or [nnz] (CSR) int32
    values_ptr,  # same layout as indices: float32 probs or integer counts
    vocab_size,
    k,  # padded row width (padded layout only)
    count_scale,  # 2**-quant_bits (count layout only)
    IS_CSR: tl.constexpr,
    VALUES_ARE_COUNTS: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block_start = tl.program_id(1) * BLOCK_SIZE
    offsets = block_start + tl.arange(0, BLOCK_SIZE)
    out_row_ptr = out_ptr + row * vocab_size
    tl.store(out_row_ptr + offsets, tl.zeros([BLOCK_SIZE], tl.float32), mask=offsets < vocab_size)
    # NOTE: the barrier orders the zero stores before the value stores of other threads of this
    # program that hit the same addresses.
    tl.debug_barrier()

    if IS_CSR:
        start = tl.load(row_start_ptr + row).to(tl.int64)
        length = tl.load(row_start_ptr + row + 1).to(tl.int64) - start
    else:
        start = row * k
        length = k + tl.zeros([], tl.int64)
    for k0 in range(0, length, K_BLOCK):
        k_offsets = k0 + tl.arange(0, K_BLOCK)
        k_mask = k_offsets < length
        idx = tl.load(indices_ptr + start + k_offsets, mask=k_mask, other=-1)
        val = tl.load(values_ptr + start + k_offsets, mask=k_mask, other=0)
        if VALUES_ARE_COUNTS:
            val = val.to(tl.float32) * count_scale
        in_block = (idx >= block_start) & (idx < block_start + BLOCK_SIZE) & (idx < vocab_size)
        tl.store(out_row_ptr + idx, val.to(tl.float32), mask=k_mask & in_block)


def _check_sparse(indices: torch.Tensor, values: torch.Tensor, ndim: int) -> None:
    if indices.ndim != ndim or values.shape != indices.shape:
        raise ValueError(
            f"sparse q̃: indices {tuple(indices.shape)} and values {tuple(values.shape)} must have "
            f"the same {ndim}-d shape"
        )
    if indices.dtype != torch.int32:
        raise TypeError(f"sparse q̃ indices must be int32, got {indices.dtype}")
    if indices.device != values.device:
        raise ValueError("sparse q̃ indices and values must be on the same device")


def _launch_scatter(out, row_start, indices, values, vocab_size, k, quant_bits, is_csr, num_rows,
                    block_size):
    counts = quant_bits is not None
    if counts and not 0 <= quant_bits <= 16:
        raise ValueError(f"quant_bits must be in [0, 16], got {quant_bits}")
    if not counts and values.dtype != torch.float32:
        raise TypeError(f"sparse q̃ probs must be float32, got {values.dtype}")
    if num_rows == 0 or vocab_size == 0:
        return out
    k_block = min(128, next_power_of_2(max(k, 1)))
    grid = (num_rows, triton.cdiv(vocab_size, block_size))
    scatter_sparse_q_kernel[grid](
        out,
        row_start if row_start is not None else indices,
        indices.contiguous(),
        values.contiguous(),
        vocab_size,
        k,
        2.0 ** -(quant_bits or 0),
        IS_CSR=is_csr,
        VALUES_ARE_COUNTS=counts,
        K_BLOCK=k_block,
        BLOCK_SIZE=block_size,
    )
    return out


def scatter_sparse_q(
    # [num_tokens, k] int32, sorted ascending, -1 padded
    indices: torch.Tensor,
    # [num_tokens, k] float32 probs, or integer counts when quant_bits is given
    values: torch.Tensor,
    vocab_size: int,
    *,
    quant_bits: int | None = None,
    block_size: int = SCATTER_BLOCK_SIZE,
) -> torch.Tensor:
    """Triton scatter of padded sparse q̃ → dense `[num_tokens, vocab_size]` float32."""
    _check_sparse(indices, values, 2)
    num_tokens, k = indices.shape
    out = torch.empty((num_tokens, vocab_size), dtype=torch.float32, device=indices.device)
    return _launch_scatter(out, None, indices, values, vocab_size, k, quant_bits, False, num_tokens,
                           block_size)


def scatter_sparse_q_counts(
    indices: torch.Tensor, counts: torch.Tensor, quant_bits: int, vocab_size: int,
    *, block_size: int = SCATTER_BLOCK_SIZE,
) -> torch.Tensor:
    """Thin wrapper: q̃ = counts / 2**quant_bits, converted inside the kernel."""
    return scatter_sparse_q(indices, counts, vocab_size, quant_bits=quant_bits,
                            block_size=block_size)


def scatter_sparse_q_csr(
    # [num_tokens + 1] int32, cu_offsets[0] == 0
    cu_offsets: torch.Tensor,
    # [nnz] int32
    indices: torch.Tensor,
    # [nnz] float32 probs, or integer counts when quant_bits is given
    values: torch.Tensor,
    vocab_size: int,
    *,
    quant_bits: int | None = None,
    block_size: int = SCATTER_BLOCK_SIZE,
) -> torch.Tensor:
    """Triton scatter of CSR sparse q̃ → dense `[num_tokens, vocab_size]` float32."""
    _check_sparse(indices, values, 1)
    if cu_offsets.ndim != 1 or cu_offsets.dtype != torch.int32:
        raise ValueError("cu_offsets must be a 1-d int32 tensor [num_tokens + 1]")
    num_tokens = cu_offsets.shape[0] - 1
    out = torch.empty((num_tokens, vocab_size), dtype=torch.float32, device=indices.device)
    # NOTE: the in-kernel loop runs to each row's own length; K_BLOCK only sets the chunk width.
    return _launch_scatter(out, cu_offsets, indices, values, vocab_size, 32, quant_bits, True,
                           num_tokens, block_size)


def counts_to_probs(counts: torch.Tensor, quant_bits: int) -> torch.Tensor:
    """q̃ = counts / 2**quant_bits in float32 (exact for quant_bits <= 16)."""
    return counts.to(torch.float32) / float(2**quant_bits)


def csr_to_padded(
    cu_offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR → padded `[num_tokens, k]` (indices padded with -1, values with 0)."""
    lengths = (cu_offsets[1:] - cu_offsets[:-1]).long()
    num_tokens = lengths.shape[0]
    k = int(lengths.max().item()) if k is None and num_tokens > 0 else (k or 0)
    rows = torch.repeat_interleave(torch.arange(num_tokens, device=indices.device), lengths)
    cols = torch.arange(indices.shape[0], device=indices.device) - cu_offsets[:-1].long()[rows]
    out_idx = torch.full((num_tokens, k), -1, dtype=torch.int32, device=indices.device)
    out_val = torch.zeros((num_tokens, k), dtype=values.dtype, device=values.device)
    out_idx[rows, cols] = indices
    out_val[rows, cols] = values
    return out_idx, out_val


def scatter_sparse_q_ref(
    # [num_tokens, k] int32, sorted ascending, -1 padded
    indices: torch.Tensor,
    # [num_tokens, k] float32
    probs: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """Torch reference (and CPU path): dense[i, indices[i, j]] = probs[i, j]; 0 elsewhere."""
    _check_sparse(indices, probs, 2)
    out = torch.zeros((indices.shape[0], vocab_size), dtype=torch.float32, device=indices.device)
    valid = indices >= 0
    rows = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1).expand_as(indices)
    out[rows[valid], indices[valid].long()] = probs[valid].to(torch.float32)
    return out


def validate_sparse_q(
    indices: torch.Tensor, counts: torch.Tensor, quant_bits: int, vocab_size: int
) -> torch.Tensor:
    """Per-row validity of padded counts-form q̃ (values, not just shapes): `[num_tokens] bool`.

    A row is valid iff its real entries are strictly ascending, inside [0, vocab_size), come
    before all padding, have counts >= 1, padding has count 0, and counts sum to 2**quant_bits.
    This syncs nothing by itself; callers decide what to do with invalid rows (DESIGN rule 7:
    fall back to a one-hot q at the drafted token).
    """
    real = indices >= 0
    in_range = (~real) | (indices < vocab_size)
    # padding only at the end: once a -1 appears the rest is padding
    padding_suffix = real[:, 1:] <= real[:, :-1]
    ascending = (~real[:, 1:]) | (indices[:, 1:] > indices[:, :-1])
    counts_ok = torch.where(real, counts >= 1, counts == 0)
    total_ok = counts.to(torch.int64).sum(dim=1) == 2**quant_bits
    return (
        in_range.all(1) & padding_suffix.all(1) & ascending.all(1) & counts_ok.all(1) & total_ok
    )
