#!/usr/bin/env python
"""Issue 12 item 2: what an undrafted request costs per step in a batch where others are drafted.

Two parts, each timed in-process on the CPU (median of repeats, one torch thread):
- ours: the proxy's per-step work (`TsltProposer.propose` + `draft_probs`, real hub, no device)
  for B requests of which D are bound and drafted (drafts injected; the hub's wait is not timed);
- vLLM's: `RejectionSampler.forward` (vLLM 0.32's own, CPU kernels) for the same batch mix, and
  the plain `Sampler` for B requests with no drafts at all (what our `_sample` shortcut takes).
The slope over undrafted requests is the per-undrafted-request cost. Writes JSON next to the
overhead benchmark. Reproduce: `.venv/bin/python scripts/bench_mixed_batch.py`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

OUT = Path("docs/benchmarks/overhead/mixed_batch.json")
GAMMA = 4


def _timed(fn, repeats: int = 40) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def proxy_cost(batch: int, drafted: int, vocab: int, tmp: Path) -> float:
    from vllm_tslt.core.sparsify import SparseQ
    from vllm_tslt.edge import proposer as proposer_module
    from vllm_tslt.protocol import Draft

    proposer_module._tokenizer_fingerprint = lambda _: "f" * 32
    config = SimpleNamespace(
        additional_config={"tslt": {"bind": "tcp://127.0.0.1:0", "stats_path": str(tmp)}},
        parallel_config=SimpleNamespace(tensor_parallel_size=1, data_parallel_size=1,
                                        data_parallel_rank=0, data_parallel_index=0,
                                        pipeline_parallel_size=1),
        speculative_config=SimpleNamespace(num_speculative_tokens=GAMMA),
        model_config=SimpleNamespace(get_vocab_size=lambda: vocab, served_model_name=None,
                                     model="m", tokenizer="unused", trust_remote_code=False))
    prop = proposer_module.TsltProposer(config)
    try:
        req_ids = [f"r{i}" for i in range(batch)]
        bound = set(req_ids[:drafted])
        prop._commit = lambda runner, rid, *a: rid in bound
        q = SparseQ(torch.arange(16, dtype=torch.int32).repeat(GAMMA, 1),
                    torch.full((GAMMA, 16), 256, dtype=torch.int32), 12)
        drafts = {rid: Draft(0, 10, 0, torch.arange(GAMMA), q) for rid in bound}
        prop.hub.collect = lambda ids, deadline: {rid: drafts[rid] for rid in ids}
        runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=req_ids))
        metadata = SimpleNamespace(
            draft_token_ids=torch.arange(GAMMA, dtype=torch.int32).repeat(drafted),
            num_draft_tokens=[GAMMA if rid in bound else 0 for rid in req_ids])
        sampled, lengths = [[1]] * batch, [10] * batch

        def step():
            prop.begin_step([])
            if drafted:
                prop.draft_probs(req_ids, metadata, torch.device("cpu"))
            prop.bind_step(runner, None)
            prop.propose(sampled, lengths, None)

        return _timed(step)
    finally:
        prop.stats.close()
        prop.hub.close()


def _metadata(batch: int):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    return SamplingMetadata(
        temperature=torch.ones(batch), all_greedy=False, all_random=True, top_p=None, top_k=None,
        generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch), presence_penalties=torch.zeros(batch),
        repetition_penalties=torch.ones(batch), output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors([]),
        spec_token_ids=[[] for _ in range(batch)])


def vllm_cost(batch: int, drafted: int, vocab: int) -> float:
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    meta = _metadata(batch)
    if drafted == 0 and batch > 0:  # what the `_sample` shortcut runs instead
        sampler = Sampler()
        logits = torch.randn(batch, vocab)
        return _timed(lambda: sampler(logits.clone(), meta))
    num_draft = [GAMMA] * drafted + [0] * (batch - drafted)
    md = SpecDecodeMetadata.make_dummy([[1] * n for n in num_draft], torch.device("cpu"))
    rows = md.logits_indices.shape[0]
    logits = torch.randn(rows, vocab)
    probs = torch.softmax(torch.randn(sum(num_draft), vocab), -1)
    sampler = RejectionSampler(Sampler())
    return _timed(lambda: sampler(md, probs, logits.clone(), meta))


def main() -> int:
    torch.set_num_threads(1)
    from vllm.platforms import current_platform

    from vllm_tslt.patches import cpu_expand

    cpu_expand.apply()
    current_platform.register_triton_kernel_overrides()
    tmp = Path("/tmp/tslt-bench-mixed-stats.json")
    rows = []
    for vocab in (4096, 32000):
        for drafted in (0, 4):
            for batch in (4, 16, 64):
                row = {"vocab_size": vocab, "batch": batch, "drafted": drafted,
                       "proxy_us": round(proxy_cost(batch, drafted, vocab, tmp), 1),
                       "vllm_sampler_us": round(vllm_cost(batch, drafted, vocab), 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    slopes = []
    for vocab in (4096, 32000):
        for drafted in (0, 4):
            a, b = (next(r for r in rows if (r["vocab_size"], r["drafted"], r["batch"]) ==
                         (vocab, drafted, n)) for n in (4, 64))
            slopes.append({"vocab_size": vocab, "drafted": drafted, **{
                f"{k}_per_undrafted_request": round((b[k] - a[k]) / 60, 1)
                for k in ("proxy_us", "vllm_sampler_us")}})
            print(json.dumps(slopes[-1]), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python scripts/bench_mixed_batch.py", "gamma": GAMMA,
                               "note": "vllm_sampler_us with drafted = 0 is vLLM's plain Sampler "
                                       "(what the _sample shortcut runs)",
                               "rows": rows, "slopes": slopes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
