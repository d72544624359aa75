"""Send-ahead branches end to end: the agent's loop (DraftRuntime) against the real DraftHub and the
fake engine (BatchEngine + HFTarget, tiny pair), over an emulated link with RTT = 2 × the step.

Exactness with branches is measured in tests/statistical/test_branch_exactness.py; here: the
plumbing — branches are forked, drafted in the proactive batch, sent, found waiting at the hub,
adopted by the device on a hit, and the run reaches the end with every request drafted for.
"""

from __future__ import annotations

import pytest

from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.drafter import Drafter
from vllm_tslt.agent.link import EmulatedLink, LinkSpec
from vllm_tslt.agent.runtime import DraftRuntime
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.testing.engine import BatchEngine, Job

pytestmark = pytest.mark.integration

STEP_S = 0.02
PROMPTS = ["def parse(text):\n    ", "import os\n\nclass Config:\n", "for i in range("]


@pytest.fixture(scope="module")
def models(tiny_pair):
    from transformers import AutoModelForCausalLM

    from vllm_tslt.testing.targets import HFTarget

    drafter = Drafter(str(tiny_pair.draft), device="cpu")
    return drafter, HFTarget(AutoModelForCausalLM.from_pretrained(tiny_pair.target))


def _run(models, budget: int, temperature: float):
    drafter, target = models
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=300),
                   vocab_size=drafter.vocab_size, vocab_fingerprint=drafter.fingerprint(),
                   model_name="tiny-target", max_gamma=4).start()
    cfg = AgentConfig(draft_model="unused", edge=hub.endpoint, num_draft_tokens=3,
                      branch_budget=budget)
    runtime = DraftRuntime(cfg, drafter, link=EmulatedLink(LinkSpec(10, 10, 2e3 * STEP_S)))
    runtime.start()
    try:
        assert runtime.wait_session(10), runtime.failure
        engine = BatchEngine(hub, target, deadline_s=0.3, seed=5, step_s=STEP_S)
        jobs = [Job(f"r{i}", runtime.session_id, drafter.tokenizer(p)["input_ids"], 32,
                    temperature=temperature) for i, p in enumerate(PROMPTS)]
        outputs = engine.run(jobs)
        assert runtime.failure is None, runtime.failure
        return outputs, engine, runtime.stats(), hub.snapshot()
    finally:
        runtime.stop()
        hub.close()


def test_branches_are_sent_found_waiting_and_adopted(models):
    outputs, engine, stats, snap = _run(models, budget=4, temperature=1.0)
    assert all(len(o) == 32 for o in outputs.values())
    assert stats["branches_forked"] >= stats["branches_sent"] > 0
    assert stats["branch_hits"] > 0 and stats["branch_bytes"] > 0
    assert stats["branch_hits"] + stats["branch_misses"] <= stats["branches_sent"]
    assert snap["drafts_ahead"] > 0 and snap["drafts_ahead_hits"] > 0
    assert snap["drafts_ahead_bytes"] > 0
    # Every request kept being drafted for after hits (adoption keeps the device in step).
    assert sum(engine.stats.drafted.values()) >= 0.8 * engine.stats.steps, engine.stats
    print({k: stats[k] for k in ("branches_sent", "branch_hits", "branch_misses", "branch_bytes",
                                 "branch_adopted_unsent", "ahead_hits", "rounds")},
          {k: v for k, v in snap.items() if k.startswith("drafts_ahead")})


def test_budget_zero_sends_no_branches(models):
    _, _, stats, _ = _run(models, budget=0, temperature=1.0)
    assert stats["branches_forked"] == stats["branches_sent"] == stats["branch_bytes"] == 0


def test_greedy_output_equals_the_target_with_branches_on(models):
    drafter, target = models
    outputs, _, _, _ = _run(models, budget=8, temperature=0.0)
    for i, p in enumerate(PROMPTS):
        assert outputs[f"r{i}"] == target.greedy(drafter.tokenizer(p)["input_ids"], 32)
