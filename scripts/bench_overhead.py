#!/usr/bin/env python
"""Issue 12's benchmark: plain vLLM vs the tslt edge without and with a device, with vLLM's own
`vllm bench serve`, interleaved rounds. Writes results.json and report.md (default
docs/benchmarks/overhead/). Reproduce: `.venv/bin/python scripts/bench_overhead.py`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from vllm_tslt.bench.overhead import Plan, ratios, run_pair, write_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", default="tiny,base", help="comma-separated built-in pairs")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--prompts-per-client", type=int, default=4,
                        help="requests per concurrent client (at least 16 per run)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/overhead"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    plan = Plan(pairs=tuple(args.pairs.split(",")), rounds=args.rounds,
                prompts_per_client=args.prompts_per_client,
                concurrencies=tuple(int(c) for c in args.concurrency.split(",")))
    os.sched_setaffinity(0, plan.client_cpus)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for pair in plan.pairs:
        records += run_pair(pair, plan, args.out)
        data = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "when": time.strftime("%Y-%m-%d %H:%M"),
                "plan": {**plan.__dict__, "edge_cpus": sorted(plan.edge_cpus),
                         "client_cpus": sorted(plan.client_cpus)},
                "records": records, "summary": ratios(records)}
        (args.out / "results.json").write_text(json.dumps(data, indent=1))
        print(write_report(data, args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
