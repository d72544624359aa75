#!/usr/bin/env python
"""Issue 15's measurement: acceptance and tokens/s for TP=1, TP=2 and DP=2 on one pair, with
scripted devices drafting, in one run (one server per system, the same workload on each).

Workload per system: 2 devices (TP: both on the one hub; DP: one per rank's hub, each request
routed with X-data-parallel-rank to its device's rank), 2 client threads, each sending
`--requests` sequential completions of `--max-tokens` tokens at `--temperature`: first without a
device (the same server decoding alone, same routing), then through the devices.
Acceptance = accepted / draft tokens verified, from the edge's per-round moments (summed over the
engines' hubs), with the capacity benchmark's round-level 95% CI.
Reproduce: `.venv/bin/python scripts/bench_scale.py` (writes results.json and report.md to --out,
default docs/benchmarks/scale/; the servers' logs go to --out/logs, not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_tslt.bench.capacity_stats import acceptance_from_moments, counters_delta, spec_counters
from vllm_tslt.edge.launch import free_port, scrape_metrics, vllm_server
from vllm_tslt.testing.devices import ModelDevice

PROMPTS = ["def read_config(path):\n", "import os\n\n\nclass ", "    for key, value in ",
           "    def ", "x = [", "class Parser:\n    def __init__(self"]
SYSTEMS = {"TP=1": [], "TP=2": ["--tensor-parallel-size", "2"],
           # one API server: with vLLM's default of one per engine, /metrics runs in prometheus
           # multiprocess mode and leaves the hubs' counters out (README, Running at scale)
           "DP=2": ["--data-parallel-size", "2", "--api-server-count", "1"]}


def run_system(name: str, extra: list[str], args, pair, out: Path) -> dict:
    from openai import OpenAI

    port = free_port()
    while True:  # rank 1's hub (DP) binds port + 1
        try:
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
        alone_tokens, alone_wall = _load(client, model, devices, args, drafted=False)
        before = scrape_metrics(url)
        tokens, wall = _load(client, model, devices, args, drafted=True)
        time.sleep(1.0)
        after = scrape_metrics(url)
        for dev in devices:
            dev.stop()
    delta = counters_delta(spec_counters(after), spec_counters(before))
    alpha, ci, n_tokens = acceptance_from_moments(delta)
    steps, proxy_steps = delta["steps"], delta["proxy_steps"]
    return {"system": name, "ready_s": round(ready_s, 1), "generated_tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "alone_tokens_per_s": round(alone_tokens / alone_wall, 2),
            "draft_tokens": int(delta["draft_tokens"]), "accepted_tokens": int(delta["accepted"]),
            "acceptance": None if alpha is None else round(alpha, 4),
            "acceptance_ci95": None if ci is None else round(ci, 4),
            "acceptance_rounds": int(delta["verify_rounds"]), "acceptance_draft_tokens": n_tokens,
            "edge_steps": int(steps),
            "draft_tokens_per_step": round(delta["draft_tokens"] / steps, 3) if steps else None,
            "draft_wait_ms_per_step": round(delta["draft_wait_microseconds"] / 1e3 / proxy_steps,
                                            3) if proxy_steps else None,
            "hub": _hub_delta(after, before)}


HUB_COUNTERS = ("drafts_received", "drafts_used", "drafts_ahead", "intake_waits",
                "intake_waited_requests", "intake_wait_misses", "requests_bound",
                "requests_without_session", "draft_rows_one_hot")


def _hub_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    start = _hub_counters(before)
    return {k: int(v - start.get(k, 0.0)) for k, v in _hub_counters(after).items()
            if v != start.get(k, 0.0)}


def _hub_counters(snapshot: dict[str, float]) -> dict[str, float]:
    """The hubs' counters that explain how many drafts were used (summed over hubs), and every
    reason a draft or request was dropped (`vllm_tslt_drafts_dropped_total{reason=...}`)."""
    out: dict[str, float] = {}
    for key, value in snapshot.items():
        name = key.split("{")[0].removesuffix("_total").removeprefix("vllm_tslt_")
        if name in HUB_COUNTERS:
            out[name] = out.get(name, 0.0) + value
        elif name == "drafts_dropped" and 'reason="' in key:
            reason = "dropped:" + key.split('reason="')[1].split('"')[0]
            out[reason] = out.get(reason, 0.0) + value
    return out


def _load(client, model: str, devices: list, args, drafted: bool) -> tuple[int, float]:
    """One client thread per device, each sending --requests sequential completions (through its
    device's session when `drafted`, else to the same rank without one): (tokens, seconds)."""
    tokens = [0] * len(devices)

    def worker(i: int) -> None:
        for r in range(args.requests):
            tokens[i] += _complete(client, model, devices[i], PROMPTS[(r + i) % len(PROMPTS)],
                                   args.max_tokens, args.temperature, drafted)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - t0


def _complete(client, model: str, dev, prompt: str, max_tokens: int, temperature: float,
              drafted: bool = True) -> int:
    route = dev.reply.limits.get("data_parallel_rank")
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
        extra_body={"vllm_xargs": {"tslt_session": dev.session_id}} if drafted else {},
        extra_headers={} if route is None else {"X-data-parallel-rank": str(route)})
    return int(out.usage.completion_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="tiny")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--requests", type=int, default=16, help="per client thread")
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
        f"tokens at temperature {record['args']['temperature']}. Acceptance is accepted ÷ "
        "draft tokens verified, with a 95% CI over verified rounds (the capacity benchmark's "
        "estimator, `bench/capacity_stats.py`), from the hubs' counters summed over engines.", "",
        "| system | acceptance ± 95% CI | rounds / draft tokens | tokens/s with devices | "
        "÷ first system | tokens/s alone | with ÷ alone | draft tokens per step | "
        "wait for drafts ms/step | ready s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        acc = "n/a" if r["acceptance"] is None else \
            f"{r['acceptance']:.3f} ± {r['acceptance_ci95'] or float('nan'):.3f}"
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "n/a"
        lines.append(f"| {r['system']} | {acc} | {r['acceptance_rounds']} / "
                     f"{r['acceptance_draft_tokens']} | {r['tokens_per_s']} | {ratio} | "
                     f"{r['alone_tokens_per_s']} | "
                     f"{r['tokens_per_s'] / r['alone_tokens_per_s']:.2f}× | "
                     f"{r['draft_tokens_per_step']} | {r['draft_wait_ms_per_step']} | "
                     f"{r['ready_s']} |")
    lines += ["", "The hubs' counters over the measured window (summed over hubs; `dropped:` "
              "lists each reason a draft or request was dropped):", ""]
    lines += [f"- {r['system']}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["hub"].items()))
              for r in results]
    lines += ["", "Every process here (the engines, their workers, the two devices' draft "
              "forwards and the clients) shares the machine's cores, unpinned: TP=2 and DP=2 "
              "compete with the devices for them. The run checks that TP=2 and DP=2 serve, "
              "draft and accept like TP=1; what they are for (a target too big for one GPU, "
              "more engines) needs GPUs to measure (README, Running at scale)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
