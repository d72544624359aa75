"""What the tslt speculative config costs requests without a device (issue 12), measured with
vLLM's own client.

Systems, per model pair, side by side in one run:

- ``plain``: ``vllm serve <target>``, no speculative config;
- ``edge, no device``: the same with ``--speculative-config '{"method": "tslt", ...}'``; the
  requests name no device session;
- ``edge + device``: the same edge through a device agent's OpenAI front (the built-in draft
  model drafting; context for the two above, not their target);
- ``edge, no device, patches off``: a third server like the second with
  ``VLLM_TSLT_OVERHEAD_PATCHES=0`` (no draft-round-trip skip, no plain-sampler shortcut): what the
  edge cost before issue 12, in the same run.

The servers run at once, pinned to the edge CPUs (an idle vLLM worker stops spinning after a
moment, so the idle one costs nothing measurable); the agent and ``vllm bench serve`` are pinned to
the other CPUs. Rounds interleave the systems (the order rotates each round) and the report gives
medians and ranges of per-round tokens/s and of per-round ratios against ``plain``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SYSTEMS = ("plain", "edge, no device", "edge + device", "edge, no device, patches off")
GAMMA = 4


@dataclass(frozen=True)
class Plan:
    pairs: tuple[str, ...] = ("tiny", "base")
    concurrencies: tuple[int, ...] = (1, 16)
    rounds: int = 3
    input_len: int = 32
    output_len: int = 64
    prompts_per_client: int = 4  # num_prompts = max(16, concurrency * this)
    edge_cpus: frozenset[int] = frozenset({0})
    client_cpus: frozenset[int] = frozenset({1})

    def num_prompts(self, concurrency: int) -> int:
        return max(16, concurrency * self.prompts_per_client)


def bench_serve(url: str, model: Path, concurrency: int, plan: Plan, out: Path,
                seed: int) -> dict[str, Any]:
    """One `vllm bench serve` run (random prompts, fixed lengths); returns its result JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vllm_tslt.cli", "vllm", "bench", "serve", "--backend", "vllm",
           "--base-url", url, "--model", str(model), "--tokenizer", str(model),
           "--dataset-name", "random", "--random-input-len", str(plan.input_len),
           "--random-output-len", str(plan.output_len), "--ignore-eos", "--temperature", "1.0",
           "--num-prompts", str(plan.num_prompts(concurrency)),
           "--max-concurrency", str(concurrency), "--seed", str(seed), "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,e2el", "--save-result",
           "--result-dir", str(out.parent), "--result-filename", out.name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True,
                       preexec_fn=lambda: os.sched_setaffinity(0, plan.client_cpus), timeout=1800)
    return json.loads(out.read_text())


@contextlib.contextmanager
def device_agent(draft: Path, hub: str, api: str, log: Path, cpus: frozenset[int]
                 ) -> Iterator[str]:
    """A real device agent (`vllm-tslt agent`) in a child process; yields its front's URL once
    it holds a session with the edge."""
    from vllm_tslt.edge.launch import free_port, spawn_server

    port = free_port()
    cmd = [sys.executable, "-m", "vllm_tslt.cli", "agent", "--draft-model", str(draft),
           "--edge", hub, "--api", api, "--listen", f"127.0.0.1:{port}", "--top-k", "16",
           "--num-draft-tokens", str(GAMMA)]
    with open(log, "w") as out:  # tied to this process like the servers (parent-death signal)
        proc = spawn_server(cmd, out, {**os.environ, "HF_HUB_OFFLINE": "1"}, set(cpus))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}; log: {log}")
            with contextlib.suppress(OSError, ValueError), \
                    urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if json.loads(resp.read()).get("session"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent has no session after 300 s; log: {log}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _slug(text: str) -> str:
    return text.replace(", ", "-").replace(" + ", "-plus-").replace(" ", "_")


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("output_throughput", "mean_tpot_ms", "median_tpot_ms", "median_ttft_ms",
            "median_e2el_ms", "completed", "total_output_tokens", "duration")
    return {k: result.get(k) for k in keys}


def run_pair(pair_name: str, plan: Plan, out_dir: Path) -> list[dict[str, Any]]:
    from vllm_tslt.edge.launch import free_port, vllm_server
    from vllm_tslt.models.pairs import ensure_pair

    pair = ensure_pair(pair_name)
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": GAMMA,
            "bind": f"tcp://127.0.0.1:{hub_port}", "draft_deadline_ms": 50}
    logs = out_dir / "logs" / pair_name
    logs.mkdir(parents=True, exist_ok=True)
    records = []
    common = {"cpus": set(plan.edge_cpus), "max_model_len": 512,
              "extra_args": ["--max-num-seqs", "32"]}
    spec_off = {**spec, "bind": f"tcp://127.0.0.1:{free_port()}"}
    with vllm_server(pair.target, logs / "plain.log", None, **common) as plain_url, \
            vllm_server(pair.target, logs / "edge.log", spec, **common) as edge_url, \
            vllm_server(pair.target, logs / "edge-off.log", spec_off,
                        env={"VLLM_TSLT_OVERHEAD_PATCHES": "0"}, **common) as off_url, \
            device_agent(pair.draft, f"tcp://127.0.0.1:{hub_port}", edge_url,
                         logs / "agent.log", plan.client_cpus) as agent_url:
        urls = {"plain": plain_url, "edge, no device": edge_url, "edge + device": agent_url,
                "edge, no device, patches off": off_url}
        for concurrency in plan.concurrencies:  # warm-up: one short run per system
            for system in SYSTEMS:
                bench_serve(urls[system], pair.target, concurrency,
                            Plan(**{**plan.__dict__, "prompts_per_client": 1}),
                            logs / f"warmup-{_slug(system)}-c{concurrency}.json", seed=0)
        for r in range(plan.rounds):
            order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[: r % len(SYSTEMS)]
            for concurrency in plan.concurrencies:
                for system in order:
                    name = _slug(f"{system}-c{concurrency}-r{r}")
                    result = bench_serve(urls[system], pair.target, concurrency, plan,
                                         logs / f"{name}.json", seed=r + 1)
                    rec = {"pair": pair_name, "system": system, "concurrency": concurrency,
                           "round": r, **summarise(result)}
                    logger.info("%s %-16s c=%-2d round %d: %.1f tok/s, TPOT %.2f ms",
                                pair_name, system, concurrency, r, rec["output_throughput"],
                                rec["mean_tpot_ms"])
                    records.append(rec)
    return records


def ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair and concurrency: median (min-max) tokens/s per system and per-round ratio vs plain."""
    out = []
    cells = sorted({(r["pair"], r["concurrency"]) for r in records})
    for pair, conc in cells:
        rows = [r for r in records if r["pair"] == pair and r["concurrency"] == conc]
        by_round = {}
        for r in rows:
            by_round.setdefault(r["round"], {})[r["system"]] = r["output_throughput"]
        for system in SYSTEMS:
            tps = [r["output_throughput"] for r in rows if r["system"] == system]
            rel = [v[system] / v["plain"] for v in by_round.values() if system in v and "plain" in v]
            tpot = [r["mean_tpot_ms"] for r in rows if r["system"] == system]
            out.append({"pair": pair, "concurrency": conc, "system": system, "rounds": len(tps),
                        "tpot_ms_median": statistics.median(tpot),
                        "tok_s_median": statistics.median(tps), "tok_s_min": min(tps),
                        "tok_s_max": max(tps), "vs_plain_median": statistics.median(rel),
                        "vs_plain_min": min(rel), "vs_plain_max": max(rel)})
    return out


def write_report(data: dict[str, Any], out_dir: Path) -> Path:
    lines = ["# Overhead of the tslt speculative config for requests without a device", "",
             f"Command: `{data['command']}`  ", f"Machine: {data['machine']}; {data['when']}", "",
             "vLLM's own client (`vllm bench serve`, random prompts of "
             f"{data['plan']['input_len']} tokens, {data['plan']['output_len']} output tokens, "
             "`--ignore-eos`, temperature 1) pinned to CPU "
             f"{sorted(data['plan']['client_cpus'])}; servers pinned to CPU "
             f"{sorted(data['plan']['edge_cpus'])}. {data['plan']['rounds']} interleaved rounds; "
             "medians with (min-max). The ratio column is the median of per-round ratios.", "",
             "| pair | concurrency | system | output tok/s | mean TPOT ms | vs plain (tok/s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in data["summary"]:
        lines.append(
            f"| {row['pair']} | {row['concurrency']} | {row['system']} | "
            f"{row['tok_s_median']:.1f} ({row['tok_s_min']:.1f}-{row['tok_s_max']:.1f}) | "
            f"{row['tpot_ms_median']:.2f} | "
            f"{row['vs_plain_median']:.3f} ({row['vs_plain_min']:.3f}-{row['vs_plain_max']:.3f}) |")
    lines += ["", *data.get("notes", [])]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
