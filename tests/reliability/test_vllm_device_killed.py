"""A device process SIGKILLed while the OpenAI client waits, through a real `vllm serve` (tiny pair).

One server for every case here (engine start: 40-120 s on 2 cores). The device is the agent's real
drafting loop in a child process (tests/reliability/device_proc.py); the app calls the edge's
OpenAI API with the device's session in ``vllm_xargs`` and blocks on the answer while the device is
killed with SIGKILL (no goodbye, sockets torn down by the kernel). The answer must be the target's
own greedy output; a sampled request must complete with max_tokens tokens; a new device must get
its drafts verified again; and the edge must stop tracking finished requests.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from vllm_tslt.edge.launch import free_port, scrape_metrics, vllm_server

from .netfaults import DeviceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DEADLINE_MS = 500
VERIFIED = "vllm_tslt_draft_tokens_verified_total"


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{hub_port}",
            "draft_deadline_ms": DEADLINE_MS}
    log = tmp_path_factory.mktemp("edge") / "vllm.log"
    with vllm_server(tiny_pair.target, log, spec) as url:
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
        yield {"url": url, "hub": f"tcp://127.0.0.1:{hub_port}", "client": client,
               "model": client.models.list().data[0].id}


@pytest.fixture(scope="module")
def greedy_reference(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pair.target))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair.target), dtype=torch.float32).eval()

    def greedy(prompt: str, n: int) -> str:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:])

    return greedy


def _verified(edge) -> float:
    return scrape_metrics(edge["url"]).get(VERIFIED, 0.0)


def _verified_above(edge, before: float, timeout_s: float = 3.0) -> bool:
    """True once the counter exceeds ``before`` (the worker writes its counters every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while _verified(edge) <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _request_in_background(edge, session: str, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def call() -> None:
        try:
            result["out"] = edge["client"].completions.create(
                model=edge["model"], extra_body={"vllm_xargs": {"tslt_session": session}},
                **kwargs)
        except Exception as e:  # re-raised by the test
            result["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, result


def _kill_once_drafting(edge, device: DeviceProcess, before: float, thread) -> None:
    """SIGKILL the device as soon as the edge has verified one of its drafts for this request."""
    deadline = time.monotonic() + 120
    while _verified(edge) <= before:
        assert thread.is_alive(), "the request finished before any draft was verified"
        assert time.monotonic() < deadline, "no draft verified"
        time.sleep(0.05)
    device.kill()
    assert device.proc.returncode == -9


def test_device_killed_while_the_client_waits(edge, tiny_pair, tmp_path, greedy_reference):
    prompts = ["def read_config(path):\n", "import os\n\n\nclass "]
    for i, prompt in enumerate(prompts):
        device = DeviceProcess(edge["hub"], tiny_pair.draft, tmp_path / f"device{i}.log")
        try:
            session = device.wait_session()
            before = _verified(edge)
            t0 = time.monotonic()
            thread, result = _request_in_background(edge, session, prompt=prompt, max_tokens=200,
                                                     temperature=0)
            _kill_once_drafting(edge, device, before, thread)
            thread.join(240)
            assert not thread.is_alive() and "error" not in result, result
            assert result["out"].choices[0].text == greedy_reference(prompt, 200), prompt
            print(f"greedy request with its device killed mid-way: {time.monotonic() - t0:.1f} s")
        finally:
            device.kill()


def test_sampled_request_completes_and_a_new_device_drafts_again(edge, tiny_pair, tmp_path):
    device = DeviceProcess(edge["hub"], tiny_pair.draft, tmp_path / "device-a.log")
    try:
        session = device.wait_session()
        before = _verified(edge)
        thread, result = _request_in_background(edge, session, prompt="    for key, value in ",
                                                 max_tokens=200, temperature=1.0)
        _kill_once_drafting(edge, device, before, thread)
        thread.join(240)
        assert not thread.is_alive() and "error" not in result, result
        choice = result["out"].choices[0]
        assert choice.text and choice.finish_reason in ("length", "stop")
        assert result["out"].usage.completion_tokens == 200 or choice.finish_reason == "stop"
    finally:
        device.kill()
    fresh = DeviceProcess(edge["hub"], tiny_pair.draft, tmp_path / "device-b.log")
    try:
        session = fresh.wait_session()
        before = _verified(edge)
        out = edge["client"].completions.create(
            model=edge["model"], prompt="def main():\n", max_tokens=32, temperature=0,
            extra_body={"vllm_xargs": {"tslt_session": session}})
        assert out.choices[0].text
        assert _verified_above(edge, before), "the new device's drafts were not verified"
    finally:
        fresh.kill()


def test_the_edge_stops_tracking_finished_requests(edge):
    """Regression: vLLM reports the last running request's finish in a step with nothing to
    compute, where propose_draft_token_ids is not called; the _update_states hook frees it."""
    time.sleep(1.2)  # the worker writes its counters every 0.5 s
    metrics = scrape_metrics(edge["url"])
    assert metrics["vllm_tslt_requests_active"] == 0, (
        f"{metrics['vllm_tslt_requests_active']:.0f} finished requests still bound at the edge")
