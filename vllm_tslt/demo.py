"""The README's main command: the full device -> edge path on a built-in model pair.

1. build (or load) the pair;
2. start the edge: `vllm-tslt serve <target> --speculative-config '{"method": "tslt", ...}'`;
3. start the device's draft agent (in this process) with its OpenAI-compatible front;
4. ask through the official `openai` client pointed at the agent; print the answers, acceptance and
   uplink bytes per draft token next to what DSD (dense logits) would have sent, and check the
   greedy answer token for token against the target decoding alone (transformers).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .edge.launch import free_port, scrape_metrics, vllm_server

PROMPTS = ["def read_config(path):\n", "import os\n\n\nclass ", "    for key, value in "]
MAX_TOKENS = 24
GAMMA = 4


@contextlib.contextmanager
def edge_server(model: Path, log_path: Path, hub_port: int, deadline_ms: float = 200.0):
    """`vllm-tslt serve` with method tslt in a child process group; yields the API URL."""
    spec = {"method": "tslt", "num_speculative_tokens": GAMMA,
            "bind": f"tcp://127.0.0.1:{hub_port}", "draft_deadline_ms": deadline_ms}
    with vllm_server(model, log_path, spec) as url:
        yield url


def vllm_generate(model: Path, prompts: list[str], max_tokens: int, log_path: Path,
                  temperature: float = 0.0, seed: int | None = None) -> list[dict]:
    """Run `vllm-tslt generate` (vllm.LLM, target alone) in a child process."""
    cmd = [sys.executable, "-m", "vllm_tslt.cli", "generate", "--model", str(model),
           "--max-tokens", str(max_tokens), "--temperature", str(temperature)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for prompt in prompts:
        cmd += ["--prompt", prompt]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM generation failed (exit {proc.returncode}); see {log_path}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def transformers_greedy(model_dir: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def dsd_bytes_per_draft_token(vocab_size: int, dtype: str) -> float:
    """What DSD's dense uplink costs per draft token at this vocabulary, framing included."""
    import torch

    from .protocol.baselines import encode_dsd

    probs = torch.full((GAMMA, vocab_size), 1.0 / vocab_size)
    return len(encode_dsd("req-0", 1, 0, torch.zeros(GAMMA, dtype=torch.long), probs,
                          dtype=dtype)) / GAMMA


def _spec_metrics(url: str) -> dict[str, float]:
    """vLLM's spec-decode counters and ours, summed over labels (drop reasons kept apart)."""
    out: dict[str, float] = {}
    for key, value in scrape_metrics(url).items():
        if key.startswith(("vllm:spec_decode_num_", "vllm_tslt_")) and "_created" not in key:
            name = key if key.startswith("vllm_tslt_drafts_dropped") else key.split("{")[0]
            out[name] = out.get(name, 0.0) + value
    return out


def run_demo(pair: str = "tiny") -> int:
    import logging

    from openai import OpenAI

    from .agent import Agent, AgentConfig
    from .models.pairs import ensure_pair
    from .models.stats import stats_table

    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    print(f"[1/4] model pair {pair!r}: building or loading from cache")
    paths = ensure_pair(pair)
    stats = paths.stats()
    print(stats_table(stats))
    log_path = Path(tempfile.gettempdir()) / "vllm-tslt-demo-edge.log"
    hub_port = free_port()
    print(f"[2/4] starting the edge: vllm-tslt serve <target> --speculative-config "
          f"'{{\"method\": \"tslt\", \"num_speculative_tokens\": {GAMMA}, ...}}' "
          f"(~1 min; log: {log_path})")
    with edge_server(paths.target, log_path, hub_port) as url:
        print(f"      edge API {url}, draft hub tcp://127.0.0.1:{hub_port}")
        print(f"[3/4] starting the device's draft agent (draft model, sparsify-then-sample with "
              f"top-k 16, 12-bit masses, gamma {GAMMA})")
        config = AgentConfig(draft_model=str(paths.draft), edge=f"tcp://127.0.0.1:{hub_port}",
                             api=url, listen="127.0.0.1:0", top_k=16, num_draft_tokens=GAMMA)
        with Agent(config) as agent:
            if not agent.wait_session(60):
                raise RuntimeError("the agent did not get a session from the edge in 60 s")
            client = OpenAI(base_url=agent.front.url + "/v1", api_key="unused", timeout=300)
            model = client.models.list().data[0].id
            print(f"[4/4] asking through the agent's OpenAI endpoint {agent.front.url}/v1")
            answers = []
            t0 = time.perf_counter()
            for prompt in PROMPTS:
                out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                temperature=0,
                                                extra_body={"return_token_ids": True})
                answers.append(out.choices[0])
                print(f"  prompt: {prompt!r}\n  answer: {out.choices[0].text!r}")
            sampled = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                temperature=1.0)
            print(f"  sampled at temperature 1: {sampled.choices[0].text!r}")
            chat = client.chat.completions.create(
                model=model, max_tokens=MAX_TOKENS, temperature=0,
                messages=[{"role": "user", "content": "Write a function that adds two numbers."}])
            print(f"  chat answer: {chat.choices[0].message.content!r}")
            elapsed = time.perf_counter() - t0
            device = agent.stats()
            edge = _spec_metrics(url)
        _report(stats, device, edge, elapsed)
    reference = transformers_greedy(paths.target, PROMPTS, MAX_TOKENS)
    same = sum(list(a.token_ids) == r for a, r in zip(answers, reference))
    print(f"  greedy answers identical to the target decoding alone: {same}/{len(PROMPTS)}")
    return 0 if same == len(PROMPTS) else 1


def _report(stats: dict, device: dict, edge: dict, elapsed: float) -> None:
    drafted = edge.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
    accepted = edge.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
    sent = max(device.get("draft_tokens_sent", 0), 1)
    uplink = device["client"]["bytes_sent"] / sent
    vocab = stats["vocab_size"]
    print("  ---")
    print(f"  acceptance (edge, vLLM's counters): {accepted:.0f}/{drafted:.0f} draft tokens = "
          f"{accepted / max(drafted, 1):.2f}")
    print(f"  uplink per draft token: TSLT {uplink:.1f} B  vs  DSD fp16 "
          f"{dsd_bytes_per_draft_token(vocab, 'fp16'):,.0f} B, DSD fp32 "
          f"{dsd_bytes_per_draft_token(vocab, 'fp32'):,.0f} B  (V = {vocab})")
    dropped = {k.split('reason="')[1].rstrip('"}'): int(v) for k, v in edge.items()
               if k.startswith("vllm_tslt_drafts_dropped_total{") and v}
    steps = max(edge.get("vllm_tslt_proxy_steps_total", 0.0), 1.0)
    print(f"  edge proxy per step: {edge.get('vllm_tslt_proxy_overhead_microseconds_total', 0) / steps:.0f}"
          f" us of work, {edge.get('vllm_tslt_draft_wait_microseconds_total', 0) / steps / 1000:.1f}"
          f" ms waiting for drafts on average")
    print(f"  drafts used by the edge: {edge.get('vllm_tslt_drafts_used_total', 0):.0f}, "
          f"steps without a usable draft: {dropped or 0}; "
          f"wall time for the 5 requests: {elapsed:.1f} s")
