"""Two vLLM 0.32 sampler gaps found by the exactness audit (docs/exactness.md notes 5 and 11),
reproduced on vLLM's own CPU rejection sampler, with what vllm-tslt does about each.

- Note 5: placeholder drafts (-1) are "accepted" by the CPU build's C++ kernel with probability
  p_prev(V-1)/q_prev(V-1) (it reads the previous row's last entry). `patches/runner.py`
  `reject_placeholders` makes them rejected, as the Triton kernel does. Bound: 0 phantom
  acceptances in 2,000 trials and the recovered token follows p (chi-square p > 1e-4); the shipped
  path is the negative control (phantom rate >= 0.9: the test sees the bug).
- Note 11: the bonus row's min_tokens mask ignores the drafts before it (vLLM, every method). The
  proxy caps drafts while a request is short of min_tokens (edge/proposer.py); this contract test
  fails once vLLM fixes it, so the cap can be dropped then.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

pytestmark = [pytest.mark.statistical, pytest.mark.unit]
V = 5
P_ROW = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])


@pytest.fixture(scope="module")
def cpu_sampler():
    from vllm.platforms import current_platform

    from vllm_tslt.patches import cpu_expand
    from vllm_tslt.testing.vllm_kernels import register_cpu_kernel_overrides

    assert current_platform.is_cpu()
    cpu_expand.apply() if not cpu_expand.PATCH.applied else None
    register_cpu_kernel_overrides()
    from vllm.v1.sample import rejection_sampler

    return rejection_sampler


def _metadata(batch: int, output_token_ids=None, logitsprocs=None, spec_token_ids=None):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    extra = {} if spec_token_ids is None else {"spec_token_ids": spec_token_ids}
    return SamplingMetadata(
        temperature=torch.ones(batch), all_greedy=False, all_random=True, top_p=None, top_k=None,
        generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch), presence_penalties=torch.zeros(batch),
        repetition_penalties=torch.ones(batch),
        output_token_ids=output_token_ids or [[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=logitsprocs or LogitsProcessors([]), **extra)


def _placeholder_trials(sample, trials: int) -> list[list[int]]:
    """Request 0 drafts token V-1 with q = δ(V-1) (p(V-1) = 0.96); request 1 was admitted with one
    token left and carries the placeholders [-1, -1] (our proxy's rows for them are all-zero)."""
    from vllm_tslt.core.sparsify import SparseQ
    from vllm_tslt.kernels.dispatch import auto_scatter_sparse_q

    draft = torch.tensor([V - 1, -1, -1], dtype=torch.int32)
    sq = SparseQ.concat([SparseQ.one_hot(torch.tensor([V - 1])),
                         SparseQ.one_hot(torch.tensor([-1, -1]))])
    q = auto_scatter_sparse_q(sq.indices, sq.counts, V, quant_bits=sq.quant_bits)
    logits = torch.log(torch.stack([torch.tensor([.01, .01, .01, .01, .96]), P_ROW, P_ROW]))
    meta = _metadata(2)
    cu = torch.tensor([1, 3], dtype=torch.int32)
    return [sample(draft, [1, 2], 2, cu, q, logits.clone(), torch.tensor([[0], [1]]), meta)[1]
            .tolist() for _ in range(trials)]


def test_placeholder_drafts_are_rejected_on_the_cpu(cpu_sampler):
    from vllm_tslt.patches import runner

    shipped = cpu_sampler.rejection_sample
    shipped = getattr(shipped, "__wrapped__", shipped)
    fixed = runner._wrap_rejection_sample(shipped)

    bad = _placeholder_trials(shipped, 500)
    phantom = sum(row[0] == -1 for row in bad) / len(bad)  # -1 "accepted", then a row-1 token
    assert phantom >= 0.9, f"negative control: the shipped CPU kernel no longer shows note 5 " \
                           f"({phantom:.3f}); re-check docs/exactness.md and drop the fix"

    good = _placeholder_trials(fixed, 2000)
    assert all(row[0] != -1 and row[1] == -1 for row in good), "a placeholder was accepted"
    observed = torch.bincount(torch.tensor([row[0] for row in good]), minlength=V).tolist()
    p_value = float(chisquare(observed, (P_ROW * len(good)).tolist()).pvalue)
    assert p_value > 1e-4, f"recovered token does not follow p: {observed} (p={p_value:.2e})"


def test_greedy_rows_keep_their_placeholders():
    from types import SimpleNamespace

    from vllm_tslt.patches.runner import reject_placeholders

    ids = torch.tensor([3, -1, -1, -1], dtype=torch.int32)
    q = torch.full((4, V), 0.2)
    meta = SimpleNamespace(all_greedy=False, temperature=torch.tensor([1.0, 0.0]))
    new_ids, new_q = reject_placeholders(ids, [2, 2], q, meta)
    assert new_ids.tolist() == [3, 0, -1, -1]  # request 0 sampled, request 1 greedy
    assert new_q[1].sum() == 0 and torch.equal(new_q[[0, 2, 3]], q[[0, 2, 3]])
    assert torch.equal(q, torch.full((4, V), 0.2))  # the caller's tensor is untouched


def test_vllm_bonus_row_ignores_drafts_for_min_tokens(cpu_sampler):
    """Contract for the proxy's min_tokens cap: one output token so far, min_tokens = 2, one
    always-accepted draft; the bonus sits at output index 2 >= min_tokens where plain decoding
    allows the stop token (p = 0.5), but vLLM 0.32 masks it."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
    from vllm.v1.sample.logits_processor.interface import BatchUpdate
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    stop, out = 3, [1]
    proc = MinTokensLogitsProcessor(None, torch.device("cpu"), False)
    params = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[stop])
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, [0], out)],
                                  moved=[]))
    meta = _metadata(1, [out], LogitsProcessors([proc]), [[0]])
    md = SpecDecodeMetadata(
        draft_token_ids=torch.tensor([0], dtype=torch.int32), num_draft_tokens=[1],
        cu_num_draft_tokens=torch.tensor([1], dtype=torch.int32),
        cu_num_sampled_tokens=torch.tensor([2], dtype=torch.int32),
        target_logits_indices=torch.tensor([0]), bonus_logits_indices=torch.tensor([1]),
        logits_indices=torch.tensor([0, 1]))
    q = torch.tensor([[1.0, 0, 0, 0]])
    logits = torch.tensor([[10.0, -1e9, -1e9, -1e9], [0.0, -1e9, -1e9, 0.0]])
    sampler = cpu_sampler.RejectionSampler(Sampler())
    stops = sum(int(sampler(md, q, logits.clone(), meta).sampled_token_ids[0, 1]) == stop
                for _ in range(400))
    assert stops == 0, f"vLLM now allows the stop token at the bonus ({stops}/400): min_tokens " \
                       "is fixed upstream; drop the proxy's min_tokens draft cap"
