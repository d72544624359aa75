"""The agent's drafting loop against the real DraftHub and a fake engine (no vLLM).

``FakeEngine`` plays vLLM's part: each step it collects a draft for the committed sequence,
verifies it against the tiny pair's target with the reference chain rejection sampler (or decodes
one token when there is none) and commits the result, in the proposer's order.
"""

from __future__ import annotations

import time

import pytest
import torch

from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.drafter import Drafter
from vllm_tslt.agent.runtime import DraftRuntime
from vllm_tslt.core.rng import exponential_noise, position_generator
from vllm_tslt.core.verify_ref import chain_rejection_sample_ref
from vllm_tslt.edge.config import TsltConfig
from vllm_tslt.edge.hub import DraftHub
from vllm_tslt.protocol import EdgeStatus

pytestmark = pytest.mark.integration
class FakeEngine:
    def __init__(self, hub, target, deadline_s: float = 0.2, step_s: float = 0.0,
                 status: EdgeStatus | None = None) -> None:
        self.hub = hub
        self.status = status  # told to devices when a request starts (the proposer's EdgeStatus)
        self.step_s = step_s  # emulated extra time per engine step (a bigger target)
        self.target = target.eval()
        self.deadline_s = deadline_s
        self.steps = 0
        self.drafted_steps = 0
        self.accepted = 0
        self.draft_tokens = 0

    @torch.inference_mode()
    def _probs(self, seq: list[int], n: int, temperature: float) -> torch.Tensor:
        """[n, vocab_size] target probabilities of the next token after each of the last n."""
        logits = self.target(input_ids=torch.tensor([seq])).logits[0, -n:].float()
        if temperature == 0:
            return torch.softmax(logits, dim=-1)
        return torch.softmax(logits / temperature, dim=-1)

    def generate(self, request_id: str, session_id: str, prompt: list[int], max_tokens: int,
                 temperature: float = 0.0, seed: int = 0) -> list[int]:
        params = {"temperature": temperature, "top_p": 1.0, "top_k": 0, "seed": seed,
                  "max_tokens": max_tokens, "max_gamma": self.hub.max_gamma}
        assert self.hub.start_request(request_id, session_id, prompt, params)
        if self.status is not None:
            self.hub.broadcast_status(self.status)
        seq = list(prompt)
        while len(seq) - len(prompt) < max_tokens:
            draft = self.hub.collect([request_id], self.deadline_s).get(request_id)
            emitted = self._step(seq, draft, temperature, seed)
            emitted = emitted[: max_tokens - (len(seq) - len(prompt))]
            seq += emitted
            verified = 0 if draft is None else min(draft.gamma, self.hub.max_gamma)
            self.hub.commit(request_id, len(seq), emitted, verified)
        self.hub.end_request(request_id, "finished")
        return seq[len(prompt):]

    def _step(self, seq: list[int], draft, temperature: float, seed: int) -> list[int]:
        self.steps += 1
        time.sleep(self.step_s)
        gen = position_generator(seed + 7, len(seq))  # the verifier's own randomness
        greedy = temperature == 0
        if draft is None:
            p = self._probs(seq, 1, temperature)[0]
            if greedy:
                return [int(p.argmax())]
            return [int(torch.argmax(p / exponential_noise(gen, p.shape)))]
        gamma = min(draft.gamma, self.hub.max_gamma)
        tokens = draft.tokens[:gamma]
        probs = self._probs(seq + tokens.tolist(), gamma + 1, temperature)
        uniforms = torch.rand(gamma, dtype=torch.float64, generator=gen)
        noise = exponential_noise(gen, (probs.shape[1],))
        emitted = chain_rejection_sample_ref(probs, tokens, draft.q.rows(0, gamma), uniforms,
                                             noise, greedy)
        self.drafted_steps += 1
        self.draft_tokens += gamma
        self.accepted += len(emitted) - 1
        return emitted


@torch.inference_mode()
def greedy_reference(target, prompt: list[int], max_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(int(target(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = ["def parse(text):\n    ", "import os\n\nclass Config:\n", "for i in range("]


@pytest.fixture(scope="module")
def models(tiny_pair):
    from transformers import AutoModelForCausalLM

    drafter = Drafter(str(tiny_pair.draft), device="cpu")
    target = AutoModelForCausalLM.from_pretrained(tiny_pair.target).eval()
    return drafter, target


@pytest.fixture()
def loop(models):
    """(runtime, hub, engine): the agent's loop thread connected to a hub on a free port."""
    drafter, target = models
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=200),
                   vocab_size=drafter.vocab_size, vocab_fingerprint=drafter.fingerprint(),
                   model_name="tiny-target", max_gamma=4).start()
    cfg = AgentConfig(draft_model="unused", edge=hub.endpoint, num_draft_tokens=4)
    runtime = DraftRuntime(cfg, drafter)
    runtime.start()
    try:
        assert runtime.wait_session(10), runtime.failure
        yield runtime, hub, FakeEngine(hub, target, step_s=0.02)
    finally:
        runtime.stop()
        hub.close()


def _prompt(drafter, i: int) -> list[int]:
    return drafter.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]


def test_greedy_loop_output_equals_target_alone(loop, models):
    runtime, _hub, engine = loop
    drafter, target = models
    for i in range(2):
        prompt = _prompt(drafter, i)
        out = engine.generate(f"g{i}", runtime.session_id, prompt, max_tokens=40)
        assert out == greedy_reference(target, prompt, 40)
    stats = runtime.stats()
    assert engine.drafted_steps > 0 and engine.accepted > 0, (engine.__dict__, stats)
    assert engine.steps < 80  # speculation saved target steps
    assert stats["proactive_rounds"] > 0
    print("greedy:", {k: stats[k] for k in ("proactive_hit_rate", "ahead_hits", "rollbacks",
                                             "drafts_sent", "rounds", "chain_matched")},
          "steps", engine.steps, "accepted/drafted", engine.accepted, engine.draft_tokens)


def test_a_paused_agent_follows_commits_sent_together(models, caplog):
    """Speculation off (min_speedup out of reach), a probe every 0.3 s: the hub holds the paused
    device's commits back and sends them together (sessions.PAUSED_COMMIT_INTERVAL_S); the agent
    follows them (no request dropped for a mismatch, no draft for a prefix that was not
    committed), it is told fewer commits than the engine took steps, it probes and pauses again,
    and the output is the target's greedy one (holding changes no output: the drafts it may drop
    are verified exactly or not used)."""
    drafter, target = models
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=200),
                   vocab_size=drafter.vocab_size, vocab_fingerprint=drafter.fingerprint(),
                   model_name="tiny-target", max_gamma=4).start()
    cfg = AgentConfig(draft_model="unused", edge=hub.endpoint, num_draft_tokens="auto",
                      min_speedup=50.0, probe_interval_s=0.3)
    runtime = DraftRuntime(cfg, drafter)
    runtime.start()
    try:
        assert runtime.wait_session(10), runtime.failure
        engine = FakeEngine(hub, target, step_s=0.02, status=EdgeStatus(25.0, 0.0, 1))
        prompt = _prompt(drafter, 0)
        with caplog.at_level("WARNING"):
            out = engine.generate("p0", runtime.session_id, prompt, max_tokens=80)
        snap, stats = hub.snapshot(), runtime.stats()
    finally:
        runtime.stop()
        hub.close()
    assert out == greedy_reference(target, prompt, 80)
    # Paused more than once: a probe (a draft after a held-back commit) came and it paused again.
    assert snap["pauses"] >= 2 and snap.get("commits_held", 0) > 0, snap
    assert stats["commits"] < engine.steps, (stats["commits"], engine.steps)
    assert snap.get("dropped_stale", 0) == 0, snap  # never a draft for a prefix not committed
    assert "dropping request" not in caplog.text
    print("paused:", {k: snap[k] for k in ("pauses", "commits_held", "drafts_received")},
          "device commits", stats["commits"], "engine steps", engine.steps)


def test_sampled_loop_rolls_back_and_reaches_the_end(loop, models):
    runtime, _hub, engine = loop
    drafter, _ = models
    prompt = _prompt(drafter, 2)
    out = engine.generate("s0", runtime.session_id, prompt, max_tokens=60, temperature=1.0,
                          seed=11)
    assert len(out) == 60
    stats = runtime.stats()
    assert stats["rollbacks"] > 0 and engine.accepted > 0, stats
    deadline = time.monotonic() + 5
    while runtime.stats()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.01)  # End reaches the device
    assert runtime.stats()["active_requests"] == 0
    print("sampled:", {k: stats[k] for k in ("proactive_hit_rate", "ahead_hits", "rollbacks",
                                              "drafts_sent", "rounds", "acceptance")},
          "steps", engine.steps, "accepted/drafted", engine.accepted, engine.draft_tokens)


def test_concurrent_requests_are_batched(loop, models):
    import threading

    runtime, hub, _engine = loop
    drafter, target = models
    outs: dict[int, list[int]] = {}

    def run(i: int) -> None:
        eng = FakeEngine(hub, target)
        outs[i] = eng.generate(f"c{i}", runtime.session_id, _prompt(drafter, i), max_tokens=24)

    calls0 = drafter.forward_calls
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(3):
        assert outs[i] == greedy_reference(target, _prompt(drafter, i), 24)
    assert drafter.forward_calls > calls0


def test_vocab_mismatch_stops_the_agent_with_the_reason(models, caplog):
    drafter, _ = models
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0"), vocab_size=drafter.vocab_size,
                   vocab_fingerprint="0" * 32, model_name="other-target", max_gamma=4).start()
    runtime = DraftRuntime(AgentConfig(draft_model="unused", edge=hub.endpoint), drafter)
    runtime.start()
    try:
        assert not runtime.wait_session(5)
        assert runtime.failure is not None and "vocab_mismatch" in str(runtime.failure)
        assert "--draft-model" in caplog.text
    finally:
        runtime.stop()
        hub.close()


def test_openai_app_through_agent_front_fake_api_and_engine(models):
    """app -> agent front -> (fake vllm serve -> fake engine <-> hub) <-> agent drafts."""
    import asyncio
    import socket
    import threading

    import openai
    from aiohttp import web

    from vllm_tslt.agent.service import Agent

    drafter, target = models
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=200),
                   vocab_size=drafter.vocab_size, vocab_fingerprint=drafter.fingerprint(),
                   model_name="tiny-target", max_gamma=4).start()
    engine = FakeEngine(hub, target)
    seen: list[dict] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        prompt = drafter.tokenizer(body["prompt"])["input_ids"]
        out = await asyncio.get_running_loop().run_in_executor(
            None, engine.generate, f"req{len(seen)}", body["vllm_xargs"]["tslt_session"],
            prompt, body["max_tokens"])
        return web.json_response({"id": "x", "object": "text_completion", "created": 0,
                                  "model": body["model"], "choices": [{
                                      "index": 0, "text": drafter.tokenizer.decode(out),
                                      "finish_reason": "length"}]})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        api_port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)

    async def serve() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", api_port).start()

    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    cfg = AgentConfig(draft_model="unused", edge=hub.endpoint, api=f"http://127.0.0.1:{api_port}",
                      listen="127.0.0.1:0", num_draft_tokens="auto")
    agent = Agent(cfg, drafter)
    try:
        agent.start()
        assert agent.wait_session(10)
        client = openai.OpenAI(base_url=agent.front.url + "/v1", api_key="x", max_retries=0,
                               timeout=30)
        text = client.completions.create(model="tiny-target", prompt=PROMPTS[0], max_tokens=32)
        prompt = drafter.tokenizer(PROMPTS[0])["input_ids"]
        assert text.choices[0].text == drafter.tokenizer.decode(greedy_reference(target, prompt, 32))
        assert seen[0]["vllm_xargs"]["tslt_session"] == agent.session_id
        assert engine.drafted_steps > 0 and engine.accepted > 0
        assert agent.stats()["drafts_sent"] > 0
    finally:
        agent.stop()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        hub.close()
