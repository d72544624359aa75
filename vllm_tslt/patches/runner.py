"""Model-runner hooks for the remote-draft proxy (vLLM 0.32.0 `GPUModelRunner`, CPU runner too).

- `propose_draft_token_ids`: vLLM calls our proposer's `propose()` without request ids or the
  scheduler output; the wrapper binds both to the proposer first, then runs vLLM's own method.
- `_update_states`: runs at the start of every step, also one with nothing to compute (where
  `propose_draft_token_ids` is not called): the wrapper hands the step's finished request ids to
  the proposer, so the last request of a burst is freed at once.
- `_sample`: a step with no draft token takes vLLM's plain sampler (the same distribution),
  not the rejection sampler on empty tensors; with TP and ``tp_check`` on, the ranks' sampled
  tokens are compared after sampling (`TsltProposer.check_sampled`).
- `take_draft_token_ids`: the drafts the engine core hands the scheduler after a step; the wrapper
  adds what the intake policy decided (edge/intake.py): drafts of parked requests, which are not in
  the batch, and the requests to park next step (`patches.scheduler` reads them).
- `_get_spec_decode_draft_probs`: the only way draft probabilities reach vLLM's rejection sampler;
  the wrapper returns the devices' sparse q̃ for exactly the drafts vLLM scheduled (dense, "scatter"
  verifier) or a `SparseDraftProbs` handle for the fused sparse verifier.
Each calls the original untouched when the drafter is not ours.
"""

from __future__ import annotations

import functools

from .patch import Patch

RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"


def _is_tslt(runner) -> bool:
    from vllm_tslt.edge.proposer import TsltProposer

    return isinstance(getattr(runner, "drafter", None), TsltProposer)


def _wrap_propose(original):
    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        if _is_tslt(self):
            self.drafter.bind_step(self, scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    return propose_draft_token_ids


def _wrap_update_states(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        if _is_tslt(self):
            self.drafter.begin_step(scheduler_output.finished_req_ids)
        return result

    return _update_states


def _wrap_draft_probs(original):
    @functools.wraps(original)
    def _get_spec_decode_draft_probs(self, spec_decode_metadata):
        if not _is_tslt(self):
            return original(self, spec_decode_metadata)
        return self.drafter.draft_probs(list(self.input_batch.req_ids), spec_decode_metadata,
                                        self.device)

    return _get_spec_decode_draft_probs


def _wrap_sample(original):
    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata):
        # A step with no draft token at all: vLLM's rejection sampler would draw every token as a
        # "bonus" with this very sampler and metadata (the uniforms and recovery noise it also
        # draws are for draft rows and skip every request with none, seeded or not), so the plain
        # sampler gives the same distribution and the same seeded streams, ~0.4 ms cheaper.
        # NOTE: with TP every rank takes the same branch: max_spec_len comes from the scheduler
        # output, which is identical on every rank.
        if not _is_tslt(self):
            return original(self, logits, spec_decode_metadata)
        if (spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0
                and _SHORTCUT):
            output = original(self, logits, None)
        else:
            output = original(self, logits, spec_decode_metadata)
        self.drafter.check_sampled(output.sampled_token_ids)  # tp_check (TP > 1), else nothing
        return output

    return _sample


def _wrap_take_draft_token_ids(original):
    @functools.wraps(original)
    def take_draft_token_ids(self):
        result = original(self)
        if not _is_tslt(self):
            return result
        from .scheduler import with_intake

        return with_intake(result, *self.drafter.take_scheduler_extras())

    return take_draft_token_ids


_SHORTCUT = True  # envs.overhead_patches_enabled(), read when the patches are applied

PATCHES = (
    Patch(RUNNER, "_sample", "0.32.0", _wrap_sample),
    Patch(RUNNER, "propose_draft_token_ids", "0.32.0", _wrap_propose),
    Patch(RUNNER, "_update_states", "0.32.0", _wrap_update_states),
    Patch(RUNNER, "_get_spec_decode_draft_probs", "0.32.0", _wrap_draft_probs),
    Patch(RUNNER, "take_draft_token_ids", "0.32.0", _wrap_take_draft_token_ids),
)


def apply() -> bool:
    global _SHORTCUT
    from vllm_tslt import envs

    _SHORTCUT = envs.overhead_patches_enabled()
    applied = False
    for patch in PATCHES:
        if not patch.applied:
            patch.apply()
            applied = True
    return applied


# --- the fused verifier: vLLM's module-level rejection_sample, looked up at call time ---------


def _wrap_rejection_sample(original):
    @functools.wraps(original)
    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                         draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                         *args, **kwargs):
        from vllm_tslt.edge.verify import SparseDraftProbs, fused_rejection_sample

        if isinstance(draft_probs, SparseDraftProbs):
            return fused_rejection_sample(
                draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                use_fp64_gumbel=kwargs.get("use_fp64_gumbel", False))
        if draft_probs is not None:
            draft_token_ids, draft_probs = reject_placeholders(
                draft_token_ids, num_draft_tokens, draft_probs, sampling_metadata)
        return original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                        draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                        *args, **kwargs)

    return rejection_sample


PATCHES = (*PATCHES, Patch("vllm.v1.sample.rejection_sampler", "rejection_sample", "0.32.0",
                           _wrap_rejection_sample))


def reject_placeholders(draft_token_ids, num_draft_tokens, draft_probs, sampling_metadata):
    """Placeholder drafts (-1: vLLM pads a request admitted with one token left to compute) must
    be rejected, as vLLM's Triton kernel does. The CPU build's C++ kernel has no such check and
    reads q and p at the previous row's last entry (docs/exactness.md note 5). For sampled rows,
    give it token 0 with q = 0 there: rejected, and the recovered token is drawn from
    max(0, p - 0) = p, exactly the Triton kernel's outcome. Greedy rows keep -1 (the greedy kernel
    rejects it already; an id of 0 could be "accepted")."""
    import torch

    placeholder = draft_token_ids < 0  # [num_tokens]
    if sampling_metadata.all_greedy or not bool(placeholder.any()):
        return draft_token_ids, draft_probs
    from vllm.v1.sample.rejection_sampler import GREEDY_TEMPERATURE

    counts = torch.as_tensor(num_draft_tokens, device=draft_token_ids.device)
    sampled = torch.repeat_interleave(
        sampling_metadata.temperature != GREEDY_TEMPERATURE, counts)  # [num_tokens]
    rows = placeholder & sampled
    draft_probs = draft_probs.clone()
    draft_probs[rows] = 0.0
    return torch.where(rows, torch.zeros_like(draft_token_ids), draft_token_ids), draft_probs
