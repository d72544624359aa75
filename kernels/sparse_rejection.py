"""Fused sparse rejection sampler: verify drafts against a sparse q̃ without a dense q.

Inputs follow vLLM 0.32's `rejection_sample` layout (see dense_rejection.py), with the dense
`draft_probs [num_tokens, vocab_size]` replaced by the sparse q̃ of each draft row and an optional
multi-candidate extension:

    draft_token_ids      [num_tokens] int32            spine candidate c_0 per position
    alt_token_ids        [num_tokens, m - 1] int32     alternatives c_1..c_{m-1}, draw order, -1 = none
    sparse_indices       [num_tokens, k] int32         S, ascending, -1 padded
    sparse_probs         [num_tokens, k] float32       q̃ on S (0 at padding)
    target_probs         [num_tokens, vocab_size] f32  processed target p (temperature applied)
    uniform_probs        [num_tokens, m] f64/f32       one uniform per candidate
    inv_q                [batch_size, vocab_size]      vLLM's q.reciprocal() (exponential noise)
    output               [batch_size, max_spec_len + 1] int32, PLACEHOLDER_TOKEN_ID = -1

Algorithm at a random position (SpecInfer recursive rejection; m = 1 is vLLM's rule):

    r <- p
    for c in (c_0, c_1, ...):                      # -1 alternatives are skipped
        accept c with probability min(1, r(c) / q̃(c))        (q̃(c) = 0 -> reject)
        on reject: r <- norm(max(0, r - q̃))
    c_0 accepted -> next position; c_i (i >= 1) accepted -> emit c_i and stop (no bonus);
    all rejected -> emit argmax_v r(v) * inv_q[req, v] and stop.

Sparse residual (why one pass over the target row plus O(k * m) is enough): keep r unnormalised
as R with mass W = sum(R), so norm(max(0, r - q̃)) ∝ max(0, R - W q̃). Outside S, q̃ = 0, hence
R(v) = p(v) for every v not in S after any number of rejections: only the k values R|_S change,
and W_i = P_out + sum_S R_i with P_out = p(V \\ S) = 1 - sum_S p (a scalar, clamped at 0).
Acceptance needs R(c) and q̃(c) for c in S (O(k) per candidate), and the final argmax needs one
pass over p and inv_q with R|_S substituted at the k sparse positions. A request therefore reads
p at O(k) gathered positions per draft row, and streams one full target row only at the position
where it rejects (zero full rows when every draft is accepted). Greedy positions stream their row
for the argmax unless `target_argmax` is given.

NOTE(exactness): with W_0 = 1 the first candidate's test is target_prob / draft_prob >= uniform
and its residual max(p - q̃, 0) * inv_q, bit for bit vLLM's expressions, so for m = 1 this sampler
and scatter + vLLM's dense sampler give identical outputs with identical noise. Sums over S are
taken strictly left to right in fp32 in every implementation (kernel, vectorised torch, reference)
so they agree bit for bit for m > 1 too; kernels are launched with fp fusion (FMA contraction) off.
"""

import torch

from ._triton_compat import next_power_of_2
from .dense_rejection import (
    PLACEHOLDER_TOKEN_ID,
    assemble_output,
    recover_chunk_rows,
    request_of_token,
)
from .sparse_rejection_triton import sparse_rejection_kernel

# Vocab block streamed per loop iteration; 4096 fp32 p + inv_q = 32 KiB in flight per program.
FUSED_BLOCK_SIZE = 4096


def _prepare_inputs(draft_token_ids, cu_num_draft_tokens, max_spec_len, target_probs,
                    sparse_indices, sparse_probs, bonus_token_ids, uniform_probs, is_greedy,
                    q, inv_q, alt_token_ids):
    """Boundary checks (shapes, dtypes, devices); returns (uniform [T, m], alt [T, m-1], inv_q)."""
    if target_probs.ndim != 2 or target_probs.dtype != torch.float32:
        raise ValueError("target_probs must be float32 [num_tokens, vocab_size]")
    num_tokens, vocab_size = target_probs.shape
    batch_size = cu_num_draft_tokens.shape[0]
    device = target_probs.device
    if draft_token_ids.shape != (num_tokens,) or draft_token_ids.dtype != torch.int32:
        raise ValueError("draft_token_ids must be int32 [num_tokens]")
    if cu_num_draft_tokens.ndim != 1 or cu_num_draft_tokens.dtype != torch.int32:
        raise ValueError("cu_num_draft_tokens must be int32 [batch_size]")
    if sparse_indices.ndim != 2 or sparse_indices.shape[0] != num_tokens:
        raise ValueError("sparse_indices must be [num_tokens, k]")
    if sparse_indices.dtype != torch.int32 or sparse_probs.dtype != torch.float32:
        raise TypeError("sparse_indices must be int32 and sparse_probs float32")
    if sparse_probs.shape != sparse_indices.shape:
        raise ValueError("sparse_probs must have the shape of sparse_indices")
    if bonus_token_ids.numel() != batch_size or is_greedy.shape != (batch_size,):
        raise ValueError("bonus_token_ids must be [batch_size, 1] and is_greedy [batch_size]")
    if is_greedy.dtype != torch.bool:
        raise TypeError("is_greedy must be bool")
    if (q is None) == (inv_q is None):
        raise ValueError("pass exactly one of q (exponential noise) and inv_q (= q.reciprocal())")
    if inv_q is None:
        # NOTE: vLLM multiplies by q.reciprocal() rather than dividing by q; so do we.
        inv_q = q.reciprocal()
    if inv_q.shape != (batch_size, vocab_size) or inv_q.dtype not in (torch.float32,
                                                                       torch.float64):
        raise ValueError("q / inv_q must be float32 or float64 [batch_size, vocab_size]")
    if alt_token_ids is None:
        alt_token_ids = torch.empty((num_tokens, 0), dtype=torch.int32, device=device)
    if alt_token_ids.ndim != 2 or alt_token_ids.shape[0] != num_tokens:
        raise ValueError("alt_token_ids must be [num_tokens, m - 1]")
    if alt_token_ids.dtype != torch.int32:
        raise TypeError("alt_token_ids must be int32")
    num_candidates = alt_token_ids.shape[1] + 1
    uniform = uniform_probs.reshape(num_tokens, -1) if uniform_probs.ndim == 1 else uniform_probs
    if uniform.shape != (num_tokens, num_candidates):
        raise ValueError(f"uniform_probs must be [num_tokens, {num_candidates}] (one per candidate)")
    for name, t in (("draft_token_ids", draft_token_ids), ("sparse_indices", sparse_indices),
                    ("uniform_probs", uniform), ("inv_q", inv_q), ("is_greedy", is_greedy),
                    ("cu_num_draft_tokens", cu_num_draft_tokens)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, target_probs on {device}")
    if max_spec_len < 0:
        raise ValueError("max_spec_len must be >= 0")
    return uniform.contiguous(), alt_token_ids.contiguous(), inv_q.contiguous()


def sparse_rejection_sample(
    # [num_tokens] int32
    draft_token_ids: torch.Tensor,
    # [batch_size] int32, inclusive cumsum
    cu_num_draft_tokens: torch.Tensor,
    max_spec_len: int,
    # [num_tokens, vocab_size] float32
    target_probs: torch.Tensor,
    # [num_tokens, k] int32
    sparse_indices: torch.Tensor,
    # [num_tokens, k] float32
    sparse_probs: torch.Tensor,
    # [batch_size, 1]
    bonus_token_ids: torch.Tensor,
    # [num_tokens] or [num_tokens, m] float64/float32
    uniform_probs: torch.Tensor,
    # [batch_size] bool
    is_greedy: torch.Tensor,
    *,
    q: torch.Tensor | None = None,
    inv_q: torch.Tensor | None = None,
    alt_token_ids: torch.Tensor | None = None,
    target_argmax: torch.Tensor | None = None,
    block_size: int = FUSED_BLOCK_SIZE,
    num_warps: int = 8,
) -> torch.Tensor:
    """Triton fused sparse rejection sampler → `[batch_size, max_spec_len + 1]` int32.

    `block_size` (vocab entries streamed per loop step) and `num_warps` are launch tunables;
    they do not change the output.
    """
    uniform, alts, inv_q = _prepare_inputs(
        draft_token_ids, cu_num_draft_tokens, max_spec_len, target_probs, sparse_indices,
        sparse_probs, bonus_token_ids, uniform_probs, is_greedy, q, inv_q, alt_token_ids)
    batch_size = cu_num_draft_tokens.shape[0]
    vocab_size = target_probs.shape[1]
    out = torch.full((batch_size, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32,
                     device=target_probs.device)
    if batch_size == 0:
        return out
    k = sparse_indices.shape[1]
    sparse_rejection_kernel[(batch_size,)](
        out,
        cu_num_draft_tokens,
        draft_token_ids,
        alts if alts.numel() > 0 else draft_token_ids,
        sparse_indices.contiguous(),
        sparse_probs.contiguous(),
        target_probs.contiguous(),
        target_argmax if target_argmax is not None else draft_token_ids,
        bonus_token_ids.reshape(-1).contiguous(),
        uniform,
        inv_q,
        is_greedy,
        max_spec_len,
        vocab_size,
        k,
        NUM_ALTS=alts.shape[1],
        K_PAD=next_power_of_2(max(k, 1)),
        HAS_TARGET_ARGMAX=target_argmax is not None,
        BLOCK_SIZE=block_size,
        num_warps=num_warps,
        # NOTE: no FMA contraction, so `residual - mass * q_s` rounds like torch does.
        enable_fp_fusion=False,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Torch implementations: the vectorised CPU path and the loop-per-row reference (the spec).
# ---------------------------------------------------------------------------------------------


def _seq_sum_columns(x: torch.Tensor) -> torch.Tensor:
    # [rows, k] -> [rows]: strictly left to right in fp32, like the kernel's _seq_sum
    acc = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for j in range(x.shape[1]):
        acc = acc + x[:, j]
    return acc


def _sparse_state(target_probs, sparse_indices, sparse_probs):
    """Valid-entry mask, q̃ on S and p gathered on S (0 at padding / out-of-range entries)."""
    vocab_size = target_probs.shape[1]
    valid = (sparse_indices >= 0) & (sparse_indices < vocab_size)
    q_s = torch.where(valid, sparse_probs, 0.0)
    safe = sparse_indices.clamp(0, max(vocab_size - 1, 0)).long()
    p_s = torch.where(valid, target_probs.gather(1, safe), 0.0)
    return valid, q_s, p_s


def sparse_rejection_sample_torch(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    max_spec_len: int,
    target_probs: torch.Tensor,
    sparse_indices: torch.Tensor,
    sparse_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniform_probs: torch.Tensor,
    is_greedy: torch.Tensor,
    *,
    q: torch.Tensor | None = None,
    inv_q: torch.Tensor | None = None,
    alt_token_ids: torch.Tensor | None = None,
    target_argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vectorised torch version of `sparse_rejection_sample` (the CPU path); same outputs.

    All positions' candidate chains run at once on [num_tokens, k] tensors (O(k * m) each);
    full target rows are read only for greedy positions and for the rows where a request's
    first rejection falls.
    """
    uniform, alts, inv_q = _prepare_inputs(
        draft_token_ids, cu_num_draft_tokens, max_spec_len, target_probs, sparse_indices,
        sparse_probs, bonus_token_ids, uniform_probs, is_greedy, q, inv_q, alt_token_ids)
    num_tokens, num_candidates = uniform.shape
    req_of_token = request_of_token(cu_num_draft_tokens, num_tokens)
    greedy_token = is_greedy[req_of_token]

    valid, q_s, residual = _sparse_state(target_probs, sparse_indices, sparse_probs)
    mass = torch.ones(num_tokens, dtype=torch.float32, device=target_probs.device)
    p_out = torch.clamp_min(1.0 - _seq_sum_columns(residual), 0.0) if num_candidates > 1 else None
    # [num_tokens] index of the accepted candidate, -1 = all rejected
    accepted_at = torch.full((num_tokens,), -1, dtype=torch.int64, device=target_probs.device)
    candidates = torch.cat([draft_token_ids.unsqueeze(1), alts], dim=1)
    for i in range(num_candidates):
        cand = candidates[:, i]
        active = (accepted_at < 0) & ((cand >= 0) if i > 0 else True)
        hit = sparse_indices == cand.unsqueeze(1)
        q_c = torch.where(hit, q_s, 0.0).sum(dim=1)
        r_c = torch.where(hit, residual, 0.0).sum(dim=1)
        ok = active & (q_c > 0) & ((r_c / (mass * q_c)).double() >= uniform[:, i].double())
        accepted_at = torch.where(ok, i, accepted_at)
        rejected = active & ~ok
        residual = torch.where(rejected.unsqueeze(1),
                               torch.clamp_min(residual - mass.unsqueeze(1) * q_s, 0.0), residual)
        if p_out is not None:
            mass = torch.where(rejected, p_out + _seq_sum_columns(residual), mass)

    argmax = target_argmax
    if argmax is None and bool(greedy_token.any()):
        argmax = torch.zeros(num_tokens, dtype=torch.int64, device=target_probs.device)
        argmax[greedy_token] = target_probs[greedy_token].argmax(dim=-1)
    spine_ok = torch.where(greedy_token, draft_token_ids.long() == (
        argmax.long() if argmax is not None else -2), accepted_at == 0)

    def emit(token_idx: torch.Tensor) -> torch.Tensor:
        tokens = candidates[token_idx, accepted_at[token_idx].clamp(min=0)].long()
        need = (~greedy_token[token_idx]) & (accepted_at[token_idx] < 0)
        if bool(need.any()):
            rows = token_idx[need]
            tokens[need] = _recover_rows(target_probs, inv_q, rows, req_of_token[rows],
                                         sparse_indices, valid, residual)
        if argmax is not None:
            tokens = torch.where(greedy_token[token_idx], argmax[token_idx].long(), tokens)
        return tokens

    return assemble_output(draft_token_ids, cu_num_draft_tokens, max_spec_len, spine_ok, emit,
                           bonus_token_ids)


def _recover_rows(target_probs, inv_q, token_idx, req_idx, indices, valid, residual):
    """argmax_v R(v) * inv_q(v) for the given draft rows; R = p outside S, `residual` on S.

    NOTE: in row chunks only to bound the [rows, vocab_size] temporaries; rows are independent.
    """
    out = []
    for chunk in torch.arange(token_idx.shape[0], device=token_idx.device).split(
            recover_chunk_rows(target_probs.shape[1])):
        tok = token_idx[chunk]
        # NOTE: advanced indexing, not index_select (much slower on CPU for long rows)
        iq = inv_q[req_idx[chunk]]
        score = target_probs[tok].to(iq.dtype).mul_(iq)
        ok = valid[tok]
        rows = torch.arange(tok.shape[0], device=tok.device).unsqueeze(1).expand_as(ok)
        cols = indices[tok][ok].long()
        score[rows[ok], cols] = residual[tok][ok].to(iq.dtype) * iq[rows[ok], cols]
        out.append(score.argmax(dim=-1))
    return torch.cat(out)


def sparse_rejection_sample_ref(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    max_spec_len: int,
    target_probs: torch.Tensor,
    sparse_indices: torch.Tensor,
    sparse_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniform_probs: torch.Tensor,
    is_greedy: torch.Tensor,
    *,
    q: torch.Tensor | None = None,
    inv_q: torch.Tensor | None = None,
    alt_token_ids: torch.Tensor | None = None,
    target_argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: one request, one position, one candidate at a time, in the paper's order.

    For each request and each of its positions j (draft row t):
      greedy:  emit argmax p_t; continue iff it equals the draft.
      random:  R <- p_t (kept explicitly on S only; R = p_t outside S), W <- 1
               for c in candidates (spine, then alternatives in draw order, -1 skipped):
                   accept iff q̃(c) > 0 and (R(c) / W) / q̃(c) >= u_{t,c}
                   else R|_S <- max(0, R|_S - W q̃), W <- p_t(V \\ S) + sum R|_S
               spine accepted -> next position; alternative accepted -> emit it, stop;
               none accepted -> emit argmax_v R(v) * inv_q[req, v], stop.
      all positions accepted -> emit the bonus token.
    """
    uniform, alts, inv_q = _prepare_inputs(
        draft_token_ids, cu_num_draft_tokens, max_spec_len, target_probs, sparse_indices,
        sparse_probs, bonus_token_ids, uniform_probs, is_greedy, q, inv_q, alt_token_ids)
    batch_size = cu_num_draft_tokens.shape[0]
    out = torch.full((batch_size, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    valid, q_s_all, p_s_all = _sparse_state(target_probs, sparse_indices, sparse_probs)
    one = torch.ones((), dtype=torch.float32)
    start = 0
    for req in range(batch_size):
        end = int(cu_num_draft_tokens[req])
        stopped = False
        for pos, t in enumerate(range(start, end)):
            draft = int(draft_token_ids[t])
            if bool(is_greedy[req]):
                argmax = int(target_argmax[t] if target_argmax is not None
                             else target_probs[t].argmax())
                out[req, pos] = argmax
                stopped = draft != argmax
            else:
                token, stopped = _verify_position_ref(
                    [draft] + [int(a) for a in alts[t]], uniform[t], target_probs[t],
                    inv_q[req], sparse_indices[t], valid[t], q_s_all[t], p_s_all[t], one)
                out[req, pos] = token
            if stopped:
                break
        if not stopped:
            out[req, end - start] = int(bonus_token_ids.reshape(-1)[req])
        start = end
    return out.to(target_probs.device)


def _verify_position_ref(candidates, uniform, p, inv_q, indices, valid, q_s, residual, one):
    """One random position: returns (token to emit, whether the request stops here)."""
    mass = one
    p_out = torch.clamp_min(one - _seq_sum_columns(residual.unsqueeze(0))[0], 0.0)
    for i, cand in enumerate(candidates):
        if i > 0 and cand < 0:
            continue  # no such alternative
        hit = indices == cand
        q_c = torch.where(hit, q_s, 0.0).sum()
        r_c = torch.where(hit, residual, 0.0).sum()
        if bool(q_c > 0) and bool((r_c / (mass * q_c)).double() >= uniform[i].double()):
            return cand, i > 0
        residual = torch.clamp_min(residual - mass * q_s, 0.0)
        mass = p_out + _seq_sum_columns(residual.unsqueeze(0))[0]
    score = p.to(inv_q.dtype) * inv_q
    cols = indices[valid].long()
    score[cols] = residual[valid].to(inv_q.dtype) * inv_q[cols]
    return int(score.argmax()), True
