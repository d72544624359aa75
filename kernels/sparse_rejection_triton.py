"""The Triton kernel of the fused sparse rejection sampler and its `@triton.jit` helpers.

One program per request walks that request's draft positions in order; the algorithm, the tensor
layout and the exactness notes are in sparse_rejection.py, next to the launch wrapper
(`sparse_rejection_sample`), the vectorised torch path and the reference it is tested against.
"""

from ._triton_compat import tl, triton

# Sentinel sparse index past any vocab block.
_NO_MORE_SPARSE = tl.constexpr(2147483647)


@triton.jit
def _seq_sum(x, lanes, n):
    # sum(x[:n]) strictly left to right in fp32 (matches the torch implementations bit for bit)
    acc = tl.zeros([], tl.float32)
    for j in range(n):
        acc += tl.sum(tl.where(lanes == j, x, 0.0))
    return acc


@triton.jit
def _sparse_index_at(indices, lanes, j, k):
    # indices[j] if it is a real entry, else the "no more entries" sentinel
    idx = tl.sum(tl.where(lanes == j, indices, 0))
    if (j >= k) or (idx < 0):
        idx = _NO_MORE_SPARSE
    return idx


@triton.jit
def _row_argmax(p_row_ptr, vocab_size, BLOCK_SIZE: tl.constexpr):
    best = tl.full((), float("-inf"), tl.float32)
    best_id = tl.zeros([], tl.int32)
    for v in range(0, vocab_size, BLOCK_SIZE):
        offsets = v + tl.arange(0, BLOCK_SIZE)
        p = tl.load(p_row_ptr + offsets, mask=offsets < vocab_size, other=float("-inf"))
        local_max, local_id = tl.max(p, axis=0, return_indices=True)
        if local_max > best:
            best = local_max
            best_id = v + local_id
    return best_id


@triton.jit
def _recover_token(p_row_ptr, inv_q_row_ptr, vocab_size, indices, residual, lanes, k,
                   BLOCK_SIZE: tl.constexpr):
    # argmax_v R(v) * inv_q(v), R = p outside S and `residual` on S; first index on ties.
    # One pass over p and inv_q; the sorted sparse entries are merged in as blocks go by.
    best = tl.full((), float("-inf"), inv_q_row_ptr.dtype.element_ty)
    best_id = tl.zeros([], tl.int32)
    j = tl.zeros([], tl.int32)
    next_idx = _sparse_index_at(indices, lanes, j, k)
    for v in range(0, vocab_size, BLOCK_SIZE):
        offsets = v + tl.arange(0, BLOCK_SIZE)
        vocab_mask = offsets < vocab_size
        p = tl.load(p_row_ptr + offsets, mask=vocab_mask, other=0.0)
        inv_q = tl.load(inv_q_row_ptr + offsets, mask=vocab_mask, other=0.0)
        score = p * inv_q
        while next_idx < v + BLOCK_SIZE:
            r = tl.sum(tl.where(lanes == j, residual, 0.0))
            score = tl.where(offsets == next_idx, r * inv_q, score)
            j += 1
            next_idx = _sparse_index_at(indices, lanes, j, k)
        score = tl.where(vocab_mask, score, float("-inf"))
        local_max, local_id = tl.max(score, axis=0, return_indices=True)
        if local_max > best:
            best = local_max
            best_id = v + local_id
    return tl.minimum(best_id, vocab_size - 1)


@triton.jit(do_not_specialize=["max_spec_len"])
def sparse_rejection_kernel(
    output_token_ids_ptr,  # [batch_size, max_spec_len + 1] int32
    cu_num_draft_tokens_ptr,  # [batch_size] int32
    draft_token_ids_ptr,  # [num_tokens] int32
    alt_token_ids_ptr,  # [num_tokens, NUM_ALTS] int32 (unused when NUM_ALTS == 0)
    sparse_indices_ptr,  # [num_tokens, k] int32
    sparse_probs_ptr,  # [num_tokens, k] float32
    target_probs_ptr,  # [num_tokens, vocab_size] float32
    target_argmax_ptr,  # [num_tokens] (used when HAS_TARGET_ARGMAX)
    bonus_token_ids_ptr,  # [batch_size]
    uniform_probs_ptr,  # [num_tokens, NUM_ALTS + 1]
    inv_q_ptr,  # [batch_size, vocab_size]
    is_greedy_ptr,  # [batch_size] bool
    max_spec_len,
    vocab_size,
    k,
    NUM_ALTS: tl.constexpr,
    K_PAD: tl.constexpr,
    HAS_TARGET_ARGMAX: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    req_idx = tl.program_id(0)
    start_idx = 0 if req_idx == 0 else tl.load(cu_num_draft_tokens_ptr + req_idx - 1)
    num_draft_tokens = tl.load(cu_num_draft_tokens_ptr + req_idx) - start_idx
    is_greedy = tl.load(is_greedy_ptr + req_idx)
    out_row_ptr = output_token_ids_ptr + req_idx * (max_spec_len + 1)
    lanes = tl.arange(0, K_PAD)
    rejected = False
    for pos in range(num_draft_tokens):
        if not rejected:
            tok = (start_idx + pos).to(tl.int64)
            draft_id = tl.load(draft_token_ids_ptr + tok)
            p_row_ptr = target_probs_ptr + tok * vocab_size
            if is_greedy:
                if HAS_TARGET_ARGMAX:
                    argmax_id = tl.load(target_argmax_ptr + tok).to(tl.int32)
                else:
                    argmax_id = _row_argmax(p_row_ptr, vocab_size, BLOCK_SIZE)
                tl.store(out_row_ptr + pos, argmax_id)
                rejected = draft_id != argmax_id
            else:
                indices = tl.load(sparse_indices_ptr + tok * k + lanes, mask=lanes < k, other=-1)
                valid = (indices >= 0) & (indices < vocab_size)
                q_s = tl.load(sparse_probs_ptr + tok * k + lanes, mask=valid, other=0.0)
                # [K_PAD] unnormalised residual on S; R = p outside S throughout
                residual = tl.load(p_row_ptr + indices, mask=valid, other=0.0)
                mass = tl.full([], 1.0, tl.float32)
                p_out = tl.zeros([], tl.float32)
                if NUM_ALTS > 0:
                    p_out = tl.maximum(1.0 - _seq_sum(residual, lanes, k), 0.0)
                done = tl.zeros([], tl.int1)
                emitted = draft_id
                for i in tl.static_range(NUM_ALTS + 1):
                    if i == 0:
                        cand = draft_id
                        present = True
                    else:
                        cand = tl.load(alt_token_ids_ptr + tok * NUM_ALTS + (i - 1))
                        present = cand >= 0
                    if (not done) and present:
                        u = tl.load(uniform_probs_ptr + tok * (NUM_ALTS + 1) + i)
                        hit = indices == cand
                        q_c = tl.sum(tl.where(hit, q_s, 0.0))
                        r_c = tl.sum(tl.where(hit, residual, 0.0))
                        # NOTE: mirrors vLLM: q̃(c) = 0 is rejected (no NaN), ratio >= uniform.
                        if q_c > 0 and r_c / (mass * q_c) >= u:
                            done = True
                            emitted = cand
                            if i > 0:
                                rejected = True
                        else:
                            residual = tl.maximum(residual - mass * q_s, 0.0)
                            if NUM_ALTS > 0:
                                mass = p_out + _seq_sum(residual, lanes, k)
                if not done:
                    rejected = True
                    emitted = _recover_token(
                        p_row_ptr, inv_q_ptr + req_idx.to(tl.int64) * vocab_size, vocab_size,
                        indices, residual, lanes, k, BLOCK_SIZE)
                tl.store(out_row_ptr + pos, emitted)
    if not rejected:
        bonus_id = tl.load(bonus_token_ids_ptr + req_idx).to(tl.int32)
        tl.store(out_row_ptr + num_draft_tokens, bonus_id)
