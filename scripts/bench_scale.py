#!/usr/bin/env python
"""Issue 15's measurement: acceptance and tokens/s for TP=1, TP=2 and DP=2 on one pair, with
scripted devices drafting, in one run (one server per system, the same workload on each).

Workload per system: 2 devices (TP: both on the one hub; DP: one per rank's hub, each request
routed with X-data-parallel-rank to its device's rank), 2 client threads, each sending
`--requests` sequential completions of `--max-tokens` tokens at `--temperature`.
Acceptance = accepted / drafted tokens from vLLM's own spec-decode counters (summed over engines).
Reproduce: `.venv/bin/python scripts/bench_scale.py` (writes --out, default
/tmp/vllm-tslt-bench-scale/results.json).
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

try:  # the scripted device may have moved to the package (issue 17)
    from vllm_tslt.testing.scripted_device import ScriptedDevice  # type: ignore
except ImportError:
    from tests.e2e.scripted_device import ScriptedDevice

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
        devices = [ScriptedDevice(hub, pair.draft, gamma=args.gamma, top_k=args.top_k)
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
    parser.add_argument("--out", type=Path, default=Path("/tmp/vllm-tslt-bench-scale"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_tslt.models.pairs import ensure_pair

    pair = ensure_pair(args.pair)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.systems.split(","):
        results.append(run_system(name, SYSTEMS[name], args, pair, args.out))
        print(json.dumps(results[-1]), flush=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "when": time.strftime("%Y-%m-%d %H:%M"), "args": {k: str(v) for k, v in
                                                                  vars(args).items()},
              "results": results}
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"{'system':<6} {'acceptance':>10} {'draft tokens':>12} {'tokens/s':>9} {'ready s':>8}")
    for r in results:
        print(f"{r['system']:<6} {r['acceptance']!s:>10} {r['draft_tokens']:>12} "
              f"{r['tokens_per_s']:>9} {r['ready_s']:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
