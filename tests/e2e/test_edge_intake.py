"""End to end: `speculative_config.intake = "adaptive"` on a real `vllm serve` (tiny pair).

Devices that draft with the target itself (every greedy draft is accepted, τ = 5) and answer a
few engine steps after each commit, next to requests without a device that keep the batch busy:
the policy parks the device's request (vLLM's scheduler leaves it out of steps,
patches/scheduler.py), waits or decodes it plainly. Whatever it chose, every output must equal
the target's greedy decoding, and the decisions must show on /metrics. Sampled outputs must follow
the target's distribution under the same policy (the chi-square test of test_edge_serve.py, with
its lying-device negative control).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_tslt.testing.devices import ModelDevice

from . import test_edge_serve as common
from .scripted_device import ScriptedDevice
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


STALLS = {"stall_every": 4, "stall_s": 0.05}  # every 4th draft 50 ms late: some steps go without


def _samples(client, device, prompt: str, total: int, n: int = 5) -> list[tuple[int, ...]]:
    """3-token continuations, n choices per request (few at a time, so drafts can be on time),
    while requests without a device keep the batch busy (a wait stalls them: the policy weighs
    that, and parks or decodes plainly some of the device's requests)."""
    model = client.models.list().data[0].id
    out: list[tuple[int, ...]] = []
    done = threading.Event()

    def background(i: int) -> None:
        while not done.is_set():
            client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=48,
                                      temperature=1.0)

    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(background, i) for i in range(3)]
        try:
            for _ in range(total // n):
                res = client.completions.create(
                    model=model, prompt=prompt, max_tokens=3, n=n, temperature=1.0,
                    extra_body={"vllm_xargs": {"tslt_session": device.session_id},
                                "return_token_ids": True})
                out.extend(tuple(c.token_ids) for c in res.choices if len(c.token_ids) == 3)
        finally:
            done.set()
        for f in busy:
            f.result()
    return out


def test_sampled_outputs_follow_the_target_under_the_intake_policy(edge, client, reference,
                                                                    tiny_pair):
    """A few sampled choices at a time share one device that drafts one request at a time, so
    some drafts are on time and some late: the policy waits, parks or decodes plainly request by
    request (every 4th honest draft is held back 50 ms, so some steps must go without). Both
    devices draft with the target itself (top-16 of it: honest samples from the q̃
    they send, accepted often enough that waiting for them pays, so the liar's drafts are used
    too and the test has power). The outputs must pass test_edge_serve's chi-square test against the target's exact
    probabilities (p > 1e-4), and a lying device (argmax drafts, uniform q̃ claimed) through the
    same edge must be rejected (p < 1e-4)."""
    prompt = "    def "
    cells = common._continuation_cells(reference, prompt, 3)
    before = metrics(edge["url"])
    honest_device = ScriptedDevice(edge["hub"], tiny_pair.target, **STALLS).start_after_handshake()
    try:
        honest = _samples(client, honest_device, prompt, 300)
    finally:
        honest_device.stop()
    after = metrics(edge["url"])
    liar = ScriptedDevice(edge["hub"], tiny_pair.target, mode="lying").start_after_handshake()
    try:
        lying = _samples(client, liar, prompt, 300)
    finally:
        liar.stop()
    lied = metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"] \
        - after["vllm_tslt_draft_tokens_verified_total"]

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    decisions = {k: delta(f"vllm_tslt_intake_{k}_total")
                 for k in ("waits", "wait_misses", "parks", "plain", "parked_plain")}
    print("intake decisions while sampling:", decisions, "verified:",
          delta("vllm_tslt_draft_tokens_verified_total"), "liar's verified:", lied)
    p_honest, p_lying = common._chi_square_p(honest, cells), common._chi_square_p(lying, cells)
    assert len(honest) > 250 and len(lying) > 250
    assert delta("vllm_tslt_draft_tokens_verified_total") > 0
    # some of the honest device's steps went without its draft (stalls): missed waits, parks or
    # plain decoding, each with its own path through the proxy and the scheduler
    assert decisions["wait_misses"] + decisions["parks"] + decisions["plain"] > 0, decisions
    assert lied > 300  # the liar (no stalls) had its drafts verified: the control has power
    assert p_honest > 1e-4, f"honest device: p={p_honest:.2e}"
    assert p_lying < 1e-4, f"negative control not rejected: p={p_lying:.2e}"
