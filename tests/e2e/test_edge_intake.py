"""End to end: `speculative_config.intake = "adaptive"` on a real `vllm serve` (tiny pair).

Devices that draft with the target itself (every greedy draft is accepted, τ = 5) and answer a
few engine steps after each commit, next to requests without a device that keep the batch busy:
the policy parks the device's request (vLLM's scheduler leaves it out of steps,
patches/scheduler.py), waits or decodes it plainly. Whatever it chose, every output must equal
the target's greedy decoding, and the decisions must show on /metrics.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_tslt.testing.devices import ModelDevice

from .server import free_port, metrics, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{hub_port}",
            "draft_deadline_ms": 2000, "intake": "adaptive", "intake_max_park_steps": 4}
    log = tmp_path_factory.mktemp("edge") / "vllm.log"
    with vllm_server(tiny_pair.target, log, spec) as url:
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
