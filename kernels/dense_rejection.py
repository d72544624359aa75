"""vLLM 0.32's dense rejection sampler, transcribed so it runs without vLLM.

This is the *baseline* the fused sparse sampler is compared against: scatter the sparse q̃ into a
dense `draft_probs [num_tokens, vocab_size]`, then run vLLM's `rejection_sample` on it. It exists
here because the GPU benchmark machine has torch and Triton but no vLLM, and the tests need the
dense semantics on the CPU.

Transcribed from `vllm/v1/sample/rejection_sampler.py` (vLLM 0.32.0, Apache-2.0): the greedy,
random and recovered-token kernels, without synthetic mode and with the noise passed in
(`inv_q = q.reciprocal()`, vLLM's per-request exponential noise, and the uniforms). Same rules:

* greedy request: emit `target_argmax` at each position; stop after the first mismatch;
* random request: accept iff draft_id >= 0 and draft_prob > 0 and
  target_prob / draft_prob >= uniform; on the first rejection emit
  recovered = argmax_v max(target_prob - draft_prob, 0) * inv_q[req] (first index on ties);
* bonus token at position num_draft_tokens when every draft was accepted;
* unused slots hold PLACEHOLDER_TOKEN_ID.
"""

import torch

from ._triton_compat import tl, triton

PLACEHOLDER_TOKEN_ID = -1
# vLLM's sample_recovered_tokens launch uses BLOCK_SIZE=8192.
RECOVERED_BLOCK_SIZE = 8192
# Torch paths materialise [rows, vocab_size] temporaries in chunks of about this many elements
# (16 MiB of fp32: small enough for the allocator to reuse instead of mapping fresh pages).
RECOVER_CHUNK_ELEMENTS = 1 << 22


def recover_chunk_rows(vocab_size: int) -> int:
    return max(1, RECOVER_CHUNK_ELEMENTS // max(vocab_size, 1))


def num_draft_tokens_from_cu(cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """[batch_size] inclusive cumsum → [batch_size] int64 counts."""
    cu = cu_num_draft_tokens.to(torch.int64)
    return cu - torch.nn.functional.pad(cu[:-1], (1, 0))


def request_of_token(cu_num_draft_tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens] int64 request index of each draft row (cu is an inclusive cumsum)."""
    tokens = torch.arange(num_tokens, device=cu_num_draft_tokens.device,
                          dtype=cu_num_draft_tokens.dtype)
    return torch.searchsorted(cu_num_draft_tokens, tokens, right=True)


def assemble_output(
    # [num_tokens] int32
    draft_token_ids: torch.Tensor,
    # [batch_size] int32
    cu_num_draft_tokens: torch.Tensor,
    max_spec_len: int,
    # [num_tokens] bool: the spine draft at this position was accepted
    spine_accepted: torch.Tensor,
    # callable(rejected_token_idx [R] int64) -> [R] int tokens emitted at the first rejection
    emit_at_rejection,
    # [batch_size, 1]
    bonus_token_ids: torch.Tensor,
) -> torch.Tensor:
    """Vectorised output assembly in vLLM's layout `[batch_size, max_spec_len + 1]` int32."""
    batch_size = cu_num_draft_tokens.shape[0]
    device = draft_token_ids.device
    out = torch.full((batch_size, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32,
                     device=device)
    num_draft = num_draft_tokens_from_cu(cu_num_draft_tokens)
    starts = cu_num_draft_tokens.to(torch.int64) - num_draft
    # [batch_size, max_spec_len]
    pos = torch.arange(max_spec_len, device=device).unsqueeze(0)
    in_range = pos < num_draft.unsqueeze(1)
    tok = (starts.unsqueeze(1) + pos).clamp(max=max(draft_token_ids.shape[0] - 1, 0))
    if draft_token_ids.shape[0] > 0:
        ok = in_range & spine_accepted[tok]
        num_accepted = ok.to(torch.int64).cumprod(dim=1).sum(dim=1)
        out[:, :max_spec_len] = torch.where(pos < num_accepted.unsqueeze(1),
                                            draft_token_ids[tok].to(torch.int32),
                                            out[:, :max_spec_len])
    else:
        num_accepted = torch.zeros_like(num_draft)
    rows = torch.arange(batch_size, device=device)
    rejected = num_accepted < num_draft
    if bool(rejected.any()):
        rej_rows = rows[rejected]
        tokens = emit_at_rejection(starts[rejected] + num_accepted[rejected])
        out[rej_rows, num_accepted[rejected]] = tokens.to(torch.int32)
    done = ~rejected
    out[rows[done], num_draft[done]] = bonus_token_ids.reshape(-1)[done].to(torch.int32)
    return out


def dense_rejection_sample_ref(
    # [num_tokens] int32
    draft_token_ids: torch.Tensor,
    # [batch_size] int32, inclusive cumsum
    cu_num_draft_tokens: torch.Tensor,
    max_spec_len: int,
    # [num_tokens, vocab_size] float32
    target_probs: torch.Tensor,
    # [num_tokens, vocab_size] float32
    draft_probs: torch.Tensor,
    # [batch_size, 1]
    bonus_token_ids: torch.Tensor,
    # [num_tokens] float64 (or float32)
    uniform_probs: torch.Tensor,
    # [batch_size] bool
    is_greedy: torch.Tensor,
    # [batch_size, vocab_size] float32/float64, vLLM's q.reciprocal()
    inv_q: torch.Tensor,
    # [num_tokens] int, defaults to target_probs.argmax(-1)
    target_argmax: torch.Tensor | None = None,
    *,
    recover_all_rows: bool = False,
) -> torch.Tensor:
    """Torch transcription of vLLM's dense `rejection_sample` (vectorised).

    With `recover_all_rows=True` the recovered token is computed for every draft row up front,
    as vLLM's `sample_recovered_tokens` does (the CPU benchmark measures that work); otherwise
    only for the rows where a request's first rejection happens. The output is the same.
    """
    num_tokens = draft_token_ids.shape[0]
    if target_argmax is None:
        target_argmax = target_probs.argmax(dim=-1)
    # [num_tokens]
    req_of_token = request_of_token(cu_num_draft_tokens, num_tokens)
    greedy_token = is_greedy[req_of_token]
    ids = draft_token_ids.to(torch.int64)
    safe = ids.clamp(min=0).unsqueeze(1)
    draft_prob = draft_probs.gather(1, safe).squeeze(1)
    target_prob = target_probs.gather(1, safe).squeeze(1)
    # NOTE(woosuk, vLLM): a zero draft probability is rejected to avoid NaNs.
    random_ok = (ids >= 0) & (draft_prob > 0) & (
        (target_prob / draft_prob).double() >= uniform_probs.reshape(num_tokens).double())
    spine_ok = torch.where(greedy_token, ids == target_argmax.to(torch.int64), random_ok)

    def recover(token_idx: torch.Tensor) -> torch.Tensor:
        # recovered = argmax(max(p - q_draft, 0) * inv_q); first index on ties.
        # NOTE: in row chunks only to bound the temporaries' memory; rows are independent.
        out = []
        for rows in token_idx.split(recover_chunk_rows(target_probs.shape[1])):
            prob = torch.clamp_min(target_probs[rows] - draft_probs[rows], 0.0)
            out.append((prob.to(inv_q.dtype) * inv_q[req_of_token[rows]]).argmax(dim=-1))
        return torch.cat(out) if out else token_idx.new_empty(0)

    all_recovered = recover(torch.arange(num_tokens, device=ids.device)) if recover_all_rows else None

    def emit(token_idx: torch.Tensor) -> torch.Tensor:
        recovered = all_recovered[token_idx] if all_recovered is not None else recover(token_idx)
        return torch.where(greedy_token[token_idx], target_argmax[token_idx].to(torch.int64),
                           recovered)

    return assemble_output(draft_token_ids, cu_num_draft_tokens, max_spec_len, spine_ok, emit,
                           bonus_token_ids)


# ---------------------------------------------------------------------------------------------
# Triton transcription of vLLM's kernels (GPU baseline for benchmarks).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _start_end(cu_ptr, req_idx):
    start_idx = 0 if req_idx == 0 else tl.load(cu_ptr + req_idx - 1)
    end_idx = tl.load(cu_ptr + req_idx)
    return start_idx, end_idx


@triton.jit(do_not_specialize=["max_spec_len"])
def dense_rejection_kernel(
    output_token_ids_ptr,  # [batch_size, max_spec_len + 1]
    cu_num_draft_tokens_ptr,  # [batch_size]
    draft_token_ids_ptr,  # [num_tokens]
    draft_probs_ptr,  # [num_tokens, vocab_size]
    target_probs_ptr,  # [num_tokens, vocab_size]
    target_argmax_ptr,  # [num_tokens]
    bonus_token_ids_ptr,  # [batch_size]
    recovered_token_ids_ptr,  # [num_tokens]
    uniform_probs_ptr,  # [num_tokens]
    is_greedy_ptr,  # [batch_size]
    max_spec_len,
    vocab_size,
):
    # vLLM's rejection_greedy_sample_kernel and rejection_random_sample_kernel in one launch.
    req_idx = tl.program_id(0)
    is_greedy = tl.load(is_greedy_ptr + req_idx)
    start_idx, end_idx = _start_end(cu_num_draft_tokens_ptr, req_idx)
    num_draft_tokens = end_idx - start_idx
    rejected = False
    for pos in range(num_draft_tokens):
        if not rejected:
            tok = (start_idx + pos).to(tl.int64)
            draft_token_id = tl.load(draft_token_ids_ptr + tok)
            if is_greedy:
                token_id = tl.load(target_argmax_ptr + tok).to(tl.int32)
                rejected = draft_token_id != token_id
            else:
                uniform_prob = tl.load(uniform_probs_ptr + tok)
                accepted = False
                if draft_token_id >= 0:
                    draft_prob = tl.load(draft_probs_ptr + tok * vocab_size + draft_token_id)
                    target_prob = tl.load(target_probs_ptr + tok * vocab_size + draft_token_id)
                    accepted = draft_prob > 0 and target_prob / draft_prob >= uniform_prob
                token_id = draft_token_id
                if not accepted:
                    rejected = True
                    token_id = tl.load(recovered_token_ids_ptr + tok)
            tl.store(output_token_ids_ptr + req_idx * (max_spec_len + 1) + pos, token_id)
    if not rejected:
        bonus_token_id = tl.load(bonus_token_ids_ptr + req_idx).to(tl.int32)
        tl.store(output_token_ids_ptr + req_idx * (max_spec_len + 1) + num_draft_tokens,
                 bonus_token_id)


@triton.jit
def sample_recovered_tokens_kernel(
    output_token_ids_ptr,  # [num_tokens]
    cu_num_draft_tokens_ptr,  # [batch_size]
    draft_probs_ptr,  # [num_tokens, vocab_size]
    target_probs_ptr,  # [num_tokens, vocab_size]
    inv_q_ptr,  # [batch_size, vocab_size]
    vocab_size,
    BLOCK_SIZE: tl.constexpr,
):
    req_idx = tl.program_id(0)
    start_idx, end_idx = _start_end(cu_num_draft_tokens_ptr, req_idx)
    pos = tl.program_id(1)
    if pos >= end_idx - start_idx:
        return
    token_idx = (start_idx + pos).to(tl.int64)
    max_val = tl.full((), float("-inf"), inv_q_ptr.dtype.element_ty)
    recovered_id = 0
    for v in range(0, vocab_size, BLOCK_SIZE):
        vocab_offset = v + tl.arange(0, BLOCK_SIZE)
        vocab_mask = vocab_offset < vocab_size
        draft_prob = tl.load(draft_probs_ptr + token_idx * vocab_size + vocab_offset,
                             mask=vocab_mask, other=0.0)
        target_prob = tl.load(target_probs_ptr + token_idx * vocab_size + vocab_offset,
                              mask=vocab_mask, other=0.0)
        prob = tl.maximum(target_prob - draft_prob, 0.0)
        inv_q = tl.load(inv_q_ptr + req_idx.to(tl.int64) * vocab_size + vocab_offset,
                        mask=vocab_mask, other=0.0)
        score = tl.where(vocab_mask, prob * inv_q, float("-inf"))
        local_max, local_id = tl.max(score, axis=0, return_indices=True)
        if local_max > max_val:
            max_val = local_max
            recovered_id = v + local_id
    recovered_id = tl.minimum(recovered_id, vocab_size - 1)
    tl.store(output_token_ids_ptr + token_idx, recovered_id)


def dense_rejection_sample_triton(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    max_spec_len: int,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniform_probs: torch.Tensor,
    is_greedy: torch.Tensor,
    inv_q: torch.Tensor,
    target_argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton transcription of vLLM's dense `rejection_sample` (same arguments as the ref)."""
    batch_size = cu_num_draft_tokens.shape[0]
    num_tokens, vocab_size = target_probs.shape
    out = torch.full((batch_size, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32,
                     device=target_probs.device)
    if batch_size == 0:
        return out
    if target_argmax is None:
        target_argmax = target_probs.argmax(dim=-1)
    recovered = torch.zeros(max(num_tokens, 1), dtype=torch.int32, device=target_probs.device)
    if num_tokens > 0 and max_spec_len > 0:
        sample_recovered_tokens_kernel[(batch_size, max_spec_len)](
            recovered, cu_num_draft_tokens, draft_probs, target_probs, inv_q.contiguous(),
            vocab_size, BLOCK_SIZE=RECOVERED_BLOCK_SIZE)
    dense_rejection_kernel[(batch_size,)](
        out, cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs, target_argmax,
        bonus_token_ids.reshape(-1), recovered, uniform_probs.reshape(-1), is_greedy,
        max_spec_len, vocab_size)
    return out
