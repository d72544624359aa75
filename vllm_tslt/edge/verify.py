"""The fused sparse verifier in vLLM's place (`speculative_config.verifier = "fused"`).

`SparseDraftProbs` travels where vLLM passes `draft_probs` (model runner -> RejectionSampler ->
`rejection_sample`); `fused_rejection_sample` replaces vLLM's module-level `rejection_sample` for it
and never builds the dense [num_tokens, vocab_size] q. Everything vLLM does before (temperature,
top-k/top-p on the target logits, the bonus token) and after stays vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseDraftProbs:
    """Sparse q̃ rows for the scheduled draft tokens, in vLLM's flattened token order."""

    indices: torch.Tensor  # [num_tokens, k] int32, ascending, -1 padded
    probs: torch.Tensor  # [num_tokens, k] float32 = counts / 2**b (exact)
    alternatives: torch.Tensor | None  # [num_tokens, m - 1] int32, -1 padded; None if m == 1

    @property
    def ndim(self) -> int:  # vLLM asserts draft_probs.ndim == 2 on some paths
        return 2

    @property
    def num_candidates(self) -> int:
        return 1 if self.alternatives is None else 1 + self.alternatives.shape[1]


def fused_rejection_sample(
    draft_token_ids: torch.Tensor,  # [num_tokens]
    num_draft_tokens: list[int],  # [batch_size]
    max_spec_len: int,
    cu_num_draft_tokens: torch.Tensor,  # [batch_size]
    draft_probs: SparseDraftProbs,
    target_logits: torch.Tensor,  # [num_tokens, vocab_size], temperature/top-k/top-p applied
    bonus_token_ids: torch.Tensor,  # [batch_size, 1]
    sampling_metadata,
    use_fp64_gumbel: bool = False,
) -> torch.Tensor:
    """[batch_size, max_spec_len + 1] int32 in vLLM's layout (placeholder -1 after the end)."""
    from vllm.v1.sample.rejection_sampler import GREEDY_TEMPERATURE, generate_uniform_probs

    from vllm_tslt.kernels.dispatch import auto_sparse_rejection_sample

    device = target_logits.device
    batch_size, num_tokens = len(num_draft_tokens), draft_token_ids.shape[0]
    if sampling_metadata.all_greedy:
        is_greedy = torch.ones(batch_size, dtype=torch.bool, device=device)
    else:
        is_greedy = sampling_metadata.temperature == GREEDY_TEMPERATURE
    # The first column is drawn exactly as vLLM draws its uniforms (same generators, same order),
    # so m = 1 reproduces vLLM's own sampler; alternatives get further columns.
    uniforms = torch.stack([
        generate_uniform_probs(num_tokens, num_draft_tokens, sampling_metadata.generators, device)
        for _ in range(draft_probs.num_candidates)], dim=1)  # [num_tokens, m]
    q = _exponential_noise(num_draft_tokens, target_logits.shape[1], sampling_metadata,
                           device, torch.float64 if use_fp64_gumbel else torch.float32)
    return auto_sparse_rejection_sample(
        draft_token_ids, cu_num_draft_tokens, max_spec_len,
        target_logits.softmax(dim=-1, dtype=torch.float32),
        draft_probs.indices.to(device), draft_probs.probs.to(device), bonus_token_ids,
        uniforms, is_greedy, q=q,
        alt_token_ids=None if draft_probs.alternatives is None else draft_probs.alternatives.to(device),
        target_argmax=target_logits.argmax(dim=-1))


def _exponential_noise(num_draft_tokens: list[int], vocab_size: int, sampling_metadata,
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # NOTE: like vllm.v1.sample.rejection_sampler.sample_recovered_tokens (0.32.0), one Exp(1)
    # row per request, from the request's generator when seeded, but only for requests with
    # draft tokens: the sampler reads no other row (vLLM draws all of them, which is most of its
    # rejection sampler's time in a batch of mostly undrafted requests: docs/overhead.md). The
    # other rows are 1 (finite, never read). Seeded streams are as vLLM's: it skips those too.
    q = torch.ones((len(num_draft_tokens), vocab_size), dtype=dtype, device=device)
    drafted = [i for i, n in enumerate(num_draft_tokens) if n > 0]
    if len(drafted) == len(num_draft_tokens):
        q.exponential_()
    elif drafted:
        rows = torch.tensor(drafted, device=device)
        q[rows] = torch.empty((len(drafted), vocab_size), dtype=dtype, device=device).exponential_()
    for i, generator in sampling_metadata.generators.items():
        if num_draft_tokens[i] > 0:
            q[i].exponential_(generator=generator)
    return q
