"""End to end: `speculative_config.intake = "adaptive"` on a real `vllm serve` (tiny pair).

Devices that draft with the target itself (every greedy draft is accepted, τ = 5) and answer a
few engine steps after each commit, next to requests without a device that keep the batch busy:
the policy parks the device's request (vLLM's scheduler leaves it out of steps,
patches/scheduler.py), waits or decodes it plainly. Whatever it chose, every output must equal
the target's greedy decoding, and the decisions must show on /metrics.

The statistical test samples at temperature 1 through the same server with the real device
runtime sending drafts ahead, its requests' intake decisions drawn at random by the test-only
switch ``tslt_test_intake_shuffle`` (so every path runs whatever the machine's timing).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_tslt.testing.devices import ModelDevice

from .continuations import chi_square_p, continuation_cells
from .server import free_port, metrics, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{hub_port}",
            "draft_deadline_ms": 2000, "intake": "adaptive", "intake_max_park_steps": 4}
    log = tmp_path_factory.mktemp("edge") / "vllm.log"
    # VLLM_TSLT_TEST_SWITCHES allows the statistical test's per-request shuffle on this server only
    with vllm_server(tiny_pair.target, log, spec, env={"VLLM_TSLT_TEST_SWITCHES": "1"}) as url:
        yield {"url": url, "hub": f"tcp://127.0.0.1:{hub_port}", "log": log}


def _greedy(reference, prompt: str, n: int) -> str:
    tok, model = reference
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:])


PROMPTS = ["def read_config(path):\n", "import os\n\n\nclass ", "    for key, value in "]


def test_parked_and_plain_requests_decode_exactly(edge, client, reference, tiny_pair):
    devices = [ModelDevice(edge["hub"], tiny_pair.target, gamma=4).start_after_handshake()
               for _ in PROMPTS]  # one device per request, as one user each
    model = client.models.list().data[0].id
    before = metrics(edge["url"])

    def complete(prompt: str, n: int, session: str | None) -> str:
        extra = {"vllm_xargs": {"tslt_session": session}} if session else {}
        out = client.completions.create(model=model, prompt=prompt, max_tokens=n,
                                        temperature=0, extra_body=extra)
        return out.choices[0].text

    try:
        with ThreadPoolExecutor(6) as pool:
            jobs = [(p, 40, d.session_id) for p, d in zip(PROMPTS, devices)] + \
                   [(p, 64, None) for p in PROMPTS]  # without a device: the batch keeps running
            texts = list(pool.map(lambda job: complete(*job), jobs))
    finally:
        for d in devices:
            d.stop()
    for (prompt, n, _), text in zip(jobs, texts):
        assert text == _greedy(reference, prompt, n), prompt
    after = metrics(edge["url"])

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    decisions = {k: delta(f"vllm_tslt_intake_{k}_total")
                 for k in ("waits", "parks", "plain", "wait_misses", "parked_plain",
                           "parked_drafted")}
    print("intake decisions:", decisions, "verified:",
          delta("vllm_tslt_draft_tokens_verified_total"))
    assert all(f"vllm_tslt_intake_{k}_total" in after for k in decisions)
    assert delta("vllm_tslt_draft_tokens_verified_total") > 0
    assert decisions["parks"] > 0, decisions  # the scheduler hook was exercised
    assert "Traceback" not in edge["log"].read_text()


SHUFFLE = "tslt_test_intake_shuffle"
# Each path at least this often during the honest samples (request-steps; steps for waits):
# about a third of what two runs here counted (waits 17-21, parks 204, plain 242, parked then
# drafted 111, drafts sent ahead found waiting 15-80).
MINIMUM = {"intake_waits": 5, "intake_parks": 50, "intake_plain": 50,
           "intake_parked_drafted": 25, "drafts_ahead_hits": 5}
LINK_RTT_MS = 40.0  # the device's emulated link: its drafts are in flight when a step ends


def _shuffled_samples(client, session: str, prompt: str, total: int, seed: int):
    """`total` unseeded 3-token continuations at temperature 1, 50 per request, every request's
    intake decisions drawn at random (seeded by `seed` and the request id)."""
    model = client.models.list().data[0].id
    samples = []
    for i in range(total // 50):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=3, n=50, temperature=1.0,
            extra_body={"vllm_xargs": {"tslt_session": session, SHUFFLE: seed + i},
                        "return_token_ids": True})
        samples.extend(tuple(c.token_ids) for c in out.choices)
    return [s for s in samples if len(s) == 3]


def _settled_metrics(url: str) -> dict:
    """/metrics once the worker's counters (written every 0.5 s) stop changing."""
    last = metrics(url)
    for _ in range(10):
        time.sleep(0.6)
        now = metrics(url)
        if now == last:
            break
        last = now
    return last


def _deltas(after: dict, before: dict, names) -> dict:
    return {k: after.get(f"vllm_tslt_{k}_total", 0) - before.get(f"vllm_tslt_{k}_total", 0)
            for k in names}


def test_every_intake_choice_with_send_ahead_follows_the_target(edge, client, reference,
                                                                 tiny_pair):
    """Wait, park and plain decoding (drawn at random each step a draft is in flight) with the
    real device runtime sending drafts ahead (branch budget 2) over an emulated 40 ms link: the
    samples must follow the target.

    Bound: chi-square of 3-token continuations of one prompt against transformers' exact target
    probabilities, p > 1e-4, N = 400. The same test through the same shuffled intake must reject
    (p < 1e-4) a lying device (argmax drafts claiming a uniform q̃: the negative control; it
    sends nothing ahead: the control for wrong-prefix use of drafts sent ahead is
    tests/statistical/test_branch_exactness.py). Every path must have run often during the
    honest samples (MINIMUM): waits, parks, parked requests verified with their draft, plain
    steps, and drafts sent ahead that a commit found waiting.
    """
    from vllm_tslt.agent.config import AgentConfig
    from vllm_tslt.agent.link import EmulatedLink, LinkSpec
    from vllm_tslt.agent.runtime import DraftRuntime

    prompt = "    def "
    cells = continuation_cells(reference, prompt, 3)
    config = AgentConfig(draft_model=str(tiny_pair.draft), edge=edge["hub"], api=edge["url"],
                         listen="127.0.0.1:0", num_draft_tokens=4, top_k=16, branch_budget=2)
    runtime = DraftRuntime(config, link=EmulatedLink(LinkSpec(10.0, 10.0, LINK_RTT_MS)))
    runtime.start()
    try:
        assert runtime.wait_session(60), runtime.failure
        before = _settled_metrics(edge["url"])
        honest = _shuffled_samples(client, runtime.session_id, prompt, 400, seed=11)
        seen = _deltas(_settled_metrics(edge["url"]), before,
                       [*MINIMUM, "draft_tokens_verified"])
    finally:
        runtime.stop()
    print("shuffled intake, honest device:", seen)
    p_honest = chi_square_p(honest, cells)

    liar = ModelDevice(edge["hub"], tiny_pair.draft, mode="lying").start_after_handshake()
    try:
        before = _settled_metrics(edge["url"])
        lying = _shuffled_samples(client, liar.session_id, prompt, 400, seed=23)
        lied = _deltas(_settled_metrics(edge["url"]), before, ["draft_tokens_verified"])
    finally:
        liar.stop()
    p_lying = chi_square_p(lying, cells)
    print(f"p honest {p_honest:.3g} (N={len(honest)}), p lying {p_lying:.3g} (N={len(lying)}), "
          f"lying drafts verified {lied}")
    assert len(honest) > 350 and len(lying) > 350
    assert all(seen[k] >= n for k, n in MINIMUM.items()), seen
    assert seen["draft_tokens_verified"] >= 200 and lied["draft_tokens_verified"] >= 200
    assert p_honest > 1e-4, f"honest device through the shuffled intake: p={p_honest:.2e}"
    assert p_lying < 1e-4, f"negative control not rejected: p={p_lying:.2e}"
