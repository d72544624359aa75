"""End to end: a real `vllm serve --speculative-config '{"method": "tslt", ...}'` on the tiny pair,
scripted devices over ZeroMQ, and the official `openai` client. One server serves every test here.
"""

from __future__ import annotations

import time

import pytest

from vllm_tslt.testing.devices import ModelDevice

from .continuations import chi_square_p, continuation_cells
from .server import free_port, metrics, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DEADLINE_MS = 3000  # generous: the scripted device recomputes every draft from scratch


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{hub_port}",
            "draft_deadline_ms": DEADLINE_MS, "wire_formats": ["tslt", "dsd-fp32"]}
    log = tmp_path_factory.mktemp("edge") / "vllm.log"
    with vllm_server(tiny_pair.target, log, spec) as url:
        yield {"url": url, "hub": f"tcp://127.0.0.1:{hub_port}", "log": log}



@pytest.fixture()
def device(edge, tiny_pair):
    dev = ModelDevice(edge["hub"], tiny_pair.draft)
    assert dev.handshake().session_id
    dev.start()
    yield dev
    dev.stop()


def _session(dev) -> dict:
    return {"vllm_xargs": {"tslt_session": dev.session_id}}



def _greedy(reference, prompt: str, n: int) -> str:
    tok, model = reference
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:])


PROMPTS = ["def read_config(path):\n", "import os\n\n\nclass ", "    for key, value in "]


def test_greedy_with_remote_drafts_equals_target_greedy(edge, client, device, reference):
    before = metrics(edge["url"])
    model = client.models.list().data[0].id
    for prompt in PROMPTS:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                        extra_body=_session(device))
        assert out.choices[0].text == _greedy(reference, prompt, 24), prompt
    after = metrics(edge["url"])
    verified = after["vllm_tslt_draft_tokens_verified_total"] - before.get(
        "vllm_tslt_draft_tokens_verified_total", 0)
    assert verified > 0, "no remote draft was verified: the test did not exercise speculation"
    accepted = [v for k, v in after.items() if k.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and accepted[0] > 0


def test_completions_chat_streaming_n_and_stop(client, device):
    model = client.models.list().data[0].id
    extra = _session(device)
    out = client.completions.create(model=model, prompt="import ", max_tokens=12, temperature=1.0,
                                    n=3, seed=5, extra_body=extra)
    assert len(out.choices) == 3 and all(c.text for c in out.choices)
    chunks = list(client.completions.create(model=model, prompt="def f(", max_tokens=12,
                                            temperature=0.8, stream=True, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    chat = client.chat.completions.create(model=model, max_tokens=12, temperature=1.0,
                                          messages=[{"role": "user", "content": "hello"}],
                                          extra_body=extra)
    assert chat.choices[0].message.content
    stream = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                            messages=[{"role": "user", "content": "hi"}],
                                            stream=True, extra_body=extra)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    stopped = client.completions.create(model=model, prompt="def main():\n", max_tokens=40,
                                        temperature=0, stop=["\n"], extra_body=extra)
    assert "\n" not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_request_without_session_and_seeded_reproducibility(client):
    model = client.models.list().data[0].id
    a, b = (client.completions.create(model=model, prompt="class ", max_tokens=16,
                                      temperature=1.0, seed=1234) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text


def _sample_continuations(client, dev, prompt: str, length: int, total: int):
    # NOTE: no seed: with n > 1 one seed would correlate the n samples of a request.
    model = client.models.list().data[0].id
    samples = []
    for _ in range(total // 50):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=length, n=50, temperature=1.0,
            extra_body={**_session(dev), "return_token_ids": True})
        samples.extend(tuple(choice.token_ids) for choice in out.choices)
    return samples


def test_temperature_one_samples_follow_the_target(edge, client, device, reference, tiny_pair):
    """Chi-square of 3-token continuations against transformers' exact target probabilities.

    Bound: p-value > 1e-4 for the honest device; the same test must reject (p < 1e-4) a lying
    device that drafts argmax tokens while claiming a uniform q̃ (negative control).
    """
    prompt = "    def "
    cells = continuation_cells(reference, prompt, 3)
    before = metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"]
    honest = [s for s in _sample_continuations(client, device, prompt, 3, 300)
              if len(s) == 3]
    assert metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"] > before
    p_honest = chi_square_p(honest, cells)

    liar = ModelDevice(edge["hub"], tiny_pair.draft, mode="lying")
    liar.handshake()
    liar.start()
    try:
        lying = [s for s in _sample_continuations(client, liar, prompt, 3, 300)
                 if len(s) == 3]
    finally:
        liar.stop()
    p_lying = chi_square_p(lying, cells)
    assert len(honest) > 250 and len(lying) > 250
    assert p_honest > 1e-4, f"honest device: p={p_honest:.2e}"
    assert p_lying < 1e-4, f"negative control not rejected: p={p_lying:.2e}"


def test_device_disconnecting_mid_generation(edge, client, tiny_pair, reference):
    dev = ModelDevice(edge["hub"], tiny_pair.draft).start_after_handshake()
    model = client.models.list().data[0].id
    prompt = "def read_config(path):\n"
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                       stream=True, extra_body=_session(dev))
    text = []
    for i, chunk in enumerate(stream):
        if i == 3:
            dev.stop()  # vanishes without a goodbye
        text.extend(c.text for c in chunk.choices)
    assert "".join(text) == _greedy(reference, prompt, 40)


def test_garbage_device_does_not_hurt_others(edge, client, tiny_pair, device, reference):
    bad = ModelDevice(edge["hub"], tiny_pair.draft, mode="garbage").start_after_handshake()
    try:
        model = client.models.list().data[0].id
        t0 = time.monotonic()
        junk = client.completions.create(model=model, prompt="import ", max_tokens=8,
                                          temperature=0, extra_body=_session(bad))
        good = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16,
                                          temperature=0, extra_body=_session(device))
        assert junk.choices[0].text == _greedy(reference, "import ", 8)
        assert good.choices[0].text == _greedy(reference, PROMPTS[0], 16)
        assert time.monotonic() - t0 < 120
        dropped = {k: v for k, v in metrics(edge["url"]).items() if "drafts_dropped" in k}
        assert any("invalid_" in k and v > 0 for k, v in dropped.items()), dropped
    finally:
        bad.stop()


def test_vocabulary_mismatch_is_refused(edge, tiny_pair):
    dev = ModelDevice(edge["hub"], tiny_pair.draft, fingerprint="0" * 32)
    try:
        reply = dev.handshake()
        assert getattr(reply, "code", "") == "vocab_mismatch"
    finally:
        dev.sock.close(linger=0)
    log = edge["log"].read_text()
    assert "refused device handshake (vocab_mismatch)" in log


def test_real_agent_through_its_openai_front(edge, tiny_pair, reference):
    """The device agent (vllm-tslt agent) + vllm serve: the app talks to the agent only."""
    from openai import OpenAI

    from vllm_tslt.agent import Agent, AgentConfig

    config = AgentConfig(draft_model=str(tiny_pair.draft), edge=edge["hub"], api=edge["url"],
                         listen="127.0.0.1:0", num_draft_tokens=4, top_k=16)
    with Agent(config) as agent:
        assert agent.wait_session(60)
        app = OpenAI(base_url=agent.front.url + "/v1", api_key="unused", timeout=300)
        model = app.models.list().data[0].id
        for prompt in PROMPTS:
            out = app.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
            assert out.choices[0].text == _greedy(reference, prompt, 24), prompt
        stream = app.chat.completions.create(model=model, max_tokens=16, temperature=1.0,
                                             messages=[{"role": "user", "content": "hi"}],
                                             stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        stats = agent.stats()
    assert stats["draft_tokens_sent"] > 0 and stats["accepted_tokens"] > 0, stats


def agent_with_wire_format_matches_target_greedy(edge, tiny_pair, reference, wire: str) -> None:
    """A real device runtime sending a baseline wire format: drafts are verified (the dense or
    top-K float q̂ reaches the verifier) and greedy output is the target's."""
    from openai import OpenAI

    from vllm_tslt.agent.config import AgentConfig
    from vllm_tslt.agent.runtime import DraftRuntime

    config = AgentConfig(draft_model=str(tiny_pair.draft), edge=edge["hub"], api=edge["url"],
                         listen="127.0.0.1:0", num_draft_tokens=4, top_k=16, wire_format=wire)
    runtime = DraftRuntime(config)
    runtime.start()
    try:
        assert runtime.wait_session(60), runtime.failure
        client = OpenAI(base_url=edge["url"] + "/v1", api_key="unused", timeout=300)
        model = client.models.list().data[0].id
        before = metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"]
        for prompt in PROMPTS[:2]:
            out = client.completions.create(
                model=model, prompt=prompt, max_tokens=24, temperature=0,
                extra_body={"vllm_xargs": {"tslt_session": runtime.session_id}})
            assert out.choices[0].text == _greedy(reference, prompt, 24), (wire, prompt)
        sampled = client.completions.create(
            model=model, prompt=PROMPTS[2], max_tokens=24, temperature=1.0,
            extra_body={"vllm_xargs": {"tslt_session": runtime.session_id}})
        assert sampled.choices[0].text
        deadline = time.monotonic() + 3  # the worker writes its counters every 0.5 s
        while metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"] <= before:
            assert time.monotonic() < deadline, f"{wire}: no draft of the device was verified"
            time.sleep(0.1)
        stats = runtime.stats()
        assert stats["draft_tokens_sent"] > 0 and stats["client"]["bytes_sent"] > 0
    finally:
        runtime.stop()


def test_dsd_fp32_drafts_through_the_scatter_verifier(edge, tiny_pair, reference):
    agent_with_wire_format_matches_target_greedy(edge, tiny_pair, reference, "dsd-fp32")


def _plain_samples(client, prompt: str, length: int, total: int, temperature: float = 1.0):
    model = client.models.list().data[0].id
    samples = []
    for _ in range(total // 50):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=length, n=50,
                                        temperature=temperature,
                                        extra_body={"return_token_ids": True})
        samples.extend(tuple(choice.token_ids) for choice in out.choices)
    return [s for s in samples if len(s) == length]


def test_requests_without_a_device_follow_the_target(client, reference):
    """Steps with no draft token take vLLM's plain sampler on a tslt edge (patches/runner.py
    `_sample`). Bound: p > 1e-4 at temperature 1; the same test must reject (p < 1e-4) samples
    drawn at temperature 0.7 (a deliberately wrong sampler: the test has power)."""
    prompt = "    def "
    cells = continuation_cells(reference, prompt, 3)
    p_plain = chi_square_p(_plain_samples(client, prompt, 3, 300), cells)
    p_wrong = chi_square_p(_plain_samples(client, prompt, 3, 300, temperature=0.7), cells)
    assert p_plain > 1e-4, f"edge without a device: p={p_plain:.2e}"
    assert p_wrong < 1e-4, f"negative control (temperature 0.7) not rejected: p={p_wrong:.2e}"


def test_mixed_batch_and_binding_mid_batch(edge, client, device, reference):
    """A request that names a device joins a batch that had none (the engine skipped the draft
    round trip until then): its drafts are taken from its first step on and its greedy output is
    the target's; the undrafted neighbours sampled alongside still follow the target."""
    import concurrent.futures
    import threading

    model = client.models.list().data[0].id
    prompt = "    def "
    cells = continuation_cells(reference, prompt, 3)
    stop = threading.Event()

    def drafted_load() -> int:  # sampled requests with drafts, side by side with the plain ones
        n = 0
        while not stop.is_set():
            client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=16, n=4,
                                      temperature=1.0, extra_body=_session(device))
            n += 1
        return n

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        long_run = pool.submit(lambda: list(client.completions.create(
            model=model, prompt=PROMPTS[1], max_tokens=120, temperature=1.0, stream=True)))
        time.sleep(1.0)  # an undrafted request is running
        before = metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"]
        out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24,
                                        temperature=0, extra_body=_session(device))
        assert out.choices[0].text == _greedy(reference, PROMPTS[0], 24)
        load = pool.submit(drafted_load)
        try:
            plain = _plain_samples(client, prompt, 3, 300)
        finally:
            stop.set()
        assert load.result(timeout=600) > 0 and long_run.result(timeout=600)
        p_plain = chi_square_p(plain, cells)
    deadline = time.monotonic() + 3  # the worker writes its counters every 0.5 s
    while metrics(edge["url"])["vllm_tslt_draft_tokens_verified_total"] <= before:
        assert time.monotonic() < deadline, "the request that joined mid-batch got no drafts"
        time.sleep(0.1)
    assert p_plain > 1e-4, f"undrafted neighbours of a drafted request: p={p_plain:.2e}"


def test_min_p_and_logit_bias_are_refused_with_a_clear_error(client):
    """vLLM 0.32 refuses them with speculative decoding on (sampling_params.py
    `_validate_spec_decode`), also for requests without a device: README says so."""
    import openai

    model = client.models.list().data[0].id
    for extra in ({"min_p": 0.1}, {"logit_bias": {"5": 1.0}}):
        with pytest.raises(openai.BadRequestError, match="not yet supported with speculative"):
            client.completions.create(model=model, prompt="import ", max_tokens=4,
                                      extra_body=extra if "min_p" in extra else None,
                                      **({} if "min_p" in extra else extra))
