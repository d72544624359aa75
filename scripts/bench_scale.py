#!/usr/bin/env python
"""Issue 15's measurement: acceptance and tokens/s for TP=1, TP=2 and DP=2 on one pair, with
scripted devices drafting, in one run (one server per system, the same workload on each).

Workload per system: 2 devices (TP: both on the one hub; DP: one per rank's hub, each request
routed with X-data-parallel-rank to its device's rank), 2 client threads, each sending
`--requests` sequential completions of `--max-tokens` tokens at `--temperature`.
Acceptance = accepted / drafted tokens from vLLM's own spec-decode counters (summed over engines).
Reproduce: `.venv/bin/python scripts/bench_scale.py` (writes results.json and report.md to --out,
default docs/benchmarks/scale/; the servers' logs go to --out/logs, not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_tslt.edge.launch import free_port, scrape_metrics, vllm_server
from vllm_tslt.testing.devices import ModelDevice

PROMPTS = ["def read_config(path):\n", "import os\n\n\nclass ", "    for key, value in ",
           "    def ", "x = [", "class Parser:\n    def __init__(self"]
SYSTEMS = {"TP=1": [], "TP=2": ["--tensor-parallel-size", "2"],
           "DP=2": ["--data-parallel-size", "2"]}


def _counter(snapshot: dict[str, float], name: str) -> float:
    return sum(v for k, v in snapshot.items() if k == name or k.startswith(name + "{"))


def run_system(name: str, extra: list[str], args, pair, out: Path) -> dict:
    from openai import OpenAI

    port = free_port()
    while True:  # rank 1's hub (DP) binds port + 1
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": args.gamma,
            "bind": f"tcp://127.0.0.1:{port}", "draft_deadline_ms": args.deadline_ms}
    dp = name.startswith("DP")
    t_start = time.perf_counter()
    with vllm_server(pair.target, out / f"{name.replace('=', '')}.log", spec,
                     extra_args=extra) as url:
        ready_s = time.perf_counter() - t_start
        hubs = [f"tcp://127.0.0.1:{port + i}" for i in range(2)] if dp else \
            [f"tcp://127.0.0.1:{port}"] * 2
        devices = [ModelDevice(hub, pair.draft, gamma=args.gamma, top_k=args.top_k)
                   for hub in hubs]
        for dev in devices:
            dev.start_after_handshake()
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
        model = client.models.list().data[0].id
        # warm-up (one request per device), not counted
        for dev in devices:
            _complete(client, model, dev, PROMPTS[0], 8, args.temperature)
        before = scrape_metrics(url)
        tokens = [0] * len(devices)

        def worker(i: int) -> None:
            for r in range(args.requests):
                prompt = PROMPTS[(r + i) % len(PROMPTS)]
                tokens[i] += _complete(client, model, devices[i], prompt, args.max_tokens,
                                       args.temperature)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        after = scrape_metrics(url)
        for dev in devices:
            dev.stop()
    drafted = _counter(after, "vllm:spec_decode_num_draft_tokens_total") - \
        _counter(before, "vllm:spec_decode_num_draft_tokens_total")
    accepted = _counter(after, "vllm:spec_decode_num_accepted_tokens_total") - \
        _counter(before, "vllm:spec_decode_num_accepted_tokens_total")
    return {"system": name, "ready_s": round(ready_s, 1), "generated_tokens": sum(tokens),
            "wall_s": round(wall, 2), "tokens_per_s": round(sum(tokens) / wall, 2),
            "draft_tokens": int(drafted), "accepted_tokens": int(accepted),
            "acceptance": round(accepted / drafted, 4) if drafted else None}


def _complete(client, model: str, dev, prompt: str, max_tokens: int, temperature: float) -> int:
    route = dev.reply.limits.get("data_parallel_rank")
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
        extra_body={"vllm_xargs": {"tslt_session": dev.session_id}},
        extra_headers={} if route is None else {"X-data-parallel-rank": str(route)})
    return int(out.usage.completion_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="tiny")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--requests", type=int, default=8, help="per client thread")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--deadline-ms", type=float, default=500.0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/scale"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_tslt.models.pairs import ensure_pair

    pair = ensure_pair(args.pair)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.systems.split(","):
        print(f"[bench_scale] {name}: starting the server", flush=True)
        results.append(run_system(name, SYSTEMS[name], args, pair, logs))
        print(json.dumps(results[-1]), flush=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "when": time.strftime("%Y-%m-%d %H:%M"), "args": {k: str(v) for k, v in
                                                                  vars(args).items()},
              "results": results}
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    report = write_report(record, args.out)
    print(report.read_text())
    return 0


def write_report(record: dict, out: Path) -> Path:
    """report.md: one row per system, tokens/s also as a ratio to the first system (TP=1)."""
    results = record["results"]
    base = results[0]["tokens_per_s"] if results else None
    lines = [
        "# Scale-out on this CPU: TP=1, TP=2 and DP=2 side by side", "",
        f"Command: `{record['command']}`  ", f"When: {record['when']}; "
        f"{os.cpu_count()} CPUs, one run, one server per system in turn.", "",
        "Each system serves the same workload: 2 scripted devices (the pair's draft model, "
        f"top-k {record['args']['top_k']}, γ = {record['args']['gamma']}), 2 client threads of "
        f"{record['args']['requests']} sequential completions of {record['args']['max_tokens']} "
        f"tokens at temperature {record['args']['temperature']}. Acceptance is vLLM's "
        "accepted ÷ draft tokens, summed over engines; its 95% interval is a binomial "
        "(Wilson) interval over draft tokens, which understates the spread when acceptances "
        "within a round are correlated.", "",
        "| system | acceptance (95% CI) | draft tokens | tokens/s | ÷ first system | ready s |",
        "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        acc = "n/a" if r["acceptance"] is None else \
            f"{r['acceptance']:.3f} ({_wilson(r['accepted_tokens'], r['draft_tokens'])})"
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "n/a"
        lines.append(f"| {r['system']} | {acc} | {r['draft_tokens']} | {r['tokens_per_s']} | "
                     f"{ratio} | {r['ready_s']} |")
    lines += ["", "On a 2-core CPU, TP=2 splits each forward over the same two cores the clients "
              "and devices also use, and DP=2 runs two engines on them: neither is expected to "
              "be faster here. The run checks that both serve, draft and accept like TP=1; "
              "their speed-up needs GPUs (README, Running at scale)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wilson(successes: int, n: int, z: float = 1.96) -> str:
    if n == 0:
        return "n/a"
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return f"{centre - half:.3f}–{centre + half:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
