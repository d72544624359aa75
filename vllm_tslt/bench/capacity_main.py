"""`make bench` / `python scripts/bench_capacity.py`: the capacity benchmark, JSON + report.

    python scripts/bench_capacity.py [--quick] [--pair tiny] [--out DIR] [--edge-cpus 0]
        [--device-cpus 1] [--device-draft-ms-per-token MS]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_tslt.bench.capacity import (
    COLOCATED_GAMMA,
    EDGE_GAMMA_MAX,
    SERVERS,
    CapacityBench,
    Cell,
    Plan,
    calibration_cell,
    cells,
)
from vllm_tslt.bench.main import _cpus, _machine
from vllm_tslt.bench.runner import TARGET_ONLY, pin_this_process


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer cells (under 10 minutes here)")
    p.add_argument("--targets", action="store_true",
                   help="issue 14's targets only: one device in 3 interleaved rounds with every "
                        "server up side by side, 16 devices, adaptive γ over the link sweep")
    p.add_argument("--intake", action="store_true",
                   help="issue 14's intake A/B only: one device at RTT 0.5 and 2 x step, the edge "
                        "with intake adaptive (gamma 4 and auto), alone and with intake wait, "
                        "beside target-only in 3 interleaved rounds (about 12 minutes)")
    p.add_argument("--pair", default="tiny", help="built-in model pair (default tiny)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default docs/benchmarks/capacity, or "
                        "bench-quick/capacity with --quick)")
    p.add_argument("--edge-cpus", default="0", help="CPUs for the vLLM servers (default 0)")
    p.add_argument("--device-cpus", default="1",
                   help="CPUs for the device farm and the clients (default 1)")
    p.add_argument("--device-draft-ms-per-token", type=float, default=None,
                   help="modelled drafting time of one device per chain token (default: measured "
                        "for one device on --device-cpus)")
    args = p.parse_args(argv)
    if args.device_draft_ms_per_token is not None and not args.device_draft_ms_per_token >= 0:
        raise SystemExit("--device-draft-ms-per-token must be >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "vllm_tslt.agent.client", "vllm_tslt.agent.runtime"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quick + args.targets + args.intake > 1:
        raise SystemExit("--quick, --targets and --intake are different plans: choose one")
    default_out = ("bench-quick/capacity" if args.quick else
                   f"docs/benchmarks/capacity{'-targets' if args.targets else ''}"
                   f"{'-intake' if args.intake else ''}"
                   f"{'' if args.pair == 'tiny' else '-' + args.pair}")
    out = args.out or Path(default_out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.make(args.quick, args.targets, args.intake)
    command = " ".join(["python scripts/bench_capacity.py", *(argv or sys.argv[1:])])
    data = run(plan, args.pair, _cpus(args.edge_cpus, "--edge-cpus"),
               _cpus(args.device_cpus, "--device-cpus"), args.device_draft_ms_per_token, command)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    from vllm_tslt.bench.capacity_report import write_report

    report = write_report(data, out)
    print(f"wrote {out / 'results.json'} and {report}")
    return 0


def run(plan: Plan, pair_name: str, edge_cpus: set[int], device_cpus: set[int],
        draft_ms: float | None, command: str) -> dict[str, Any]:
    from vllm_tslt.bench.farm import measure_draft_ms_per_token
    from vllm_tslt.bench.runner import TSLT_P
    from vllm_tslt.edge.launch import free_port, vllm_server
    from vllm_tslt.models.pairs import ensure_pair

    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    pair = ensure_pair(pair_name)
    stats = pair.stats()
    pin_this_process(device_cpus)
    sys.setswitchinterval(0.001)  # the farm's loop and the clients share this process's GIL
    hub = f"tcp://127.0.0.1:{free_port()}"
    bench = CapacityBench(pair, plan, hub, 0.0)
    measured_ms = measure_draft_ms_per_token(
        bench.drafter_for(Cell("calibration", TSLT_P, "4", 1, 0.0, 100.0)))
    draft_ms = measured_ms if draft_ms is None else draft_ms
    print(f"device drafting time: {draft_ms:.2f} ms per chain token (measured for one device: "
          f"{measured_ms:.2f} ms)", flush=True)
    logs = Path(tempfile.gettempdir()) / "vllm-tslt-capacity"
    logs.mkdir(exist_ok=True)
    tslt = {"method": "tslt", "num_speculative_tokens": EDGE_GAMMA_MAX, "bind": hub,
            "verifier": "fused", "max_candidates": 1}
    colocated = {"method": "draft_model", "model": str(pair.draft),
                 "num_speculative_tokens": COLOCATED_GAMMA, "draft_sample_method": "probabilistic"}
    todo = cells(plan)
    specs = {"target": None, "colocated": colocated, "edge": {**tslt, "intake": "adaptive"},
             "edge-wait": {**tslt, "intake": "wait"}}
    servers = [(name, specs[name], [c for c in todo if c.system.server == name])
               for name in SERVERS]
    servers = [s for s in servers if s[2] or s[0] == "target"]  # target: the calibration
    max_n = max(plan.devices)
    common = {"cpus": edge_cpus, "max_model_len": 512,
              "extra_args": ["--max-num-seqs", str(max(64, 2 * max_n))]}
    bench.draft_ms = draft_ms
    progress = _Progress(len(todo) + 1)
    external: dict[str, Any] | None = None

    def start(stack: contextlib.ExitStack, i: int, name: str, spec: dict[str, Any] | None
              ) -> str:
        if spec is not None and spec.get("method") == "tslt" and plan.interleaved:  # a hub each
            bench.hubs[name] = f"tcp://127.0.0.1:{free_port()}"
            spec = {**spec, "bind": bench.hubs[name]}
        print(f"[server {i}/{len(servers)}] starting {name} vLLM on CPU(s) {sorted(edge_cpus)} "
              f"(log {logs / name}.log)", flush=True)
        return stack.enter_context(vllm_server(pair.target, logs / f"{name}.log", spec, **common))

    def calibrate(url: str) -> dict[str, Any] | None:
        rec = bench.run_cell(calibration_cell(), url)
        bench.step_ms = rec["tpot_p50_ms"]
        progress.line(f"calibration: target-only TPOT at batch 1 = {bench.step_ms:.2f} ms: RTTs "
                      "are multiples of this")
        return _external_check(bench, url, pair, logs, device_cpus) if plan.external_check \
            else None

    if plan.interleaved:  # every server up at once, cells in the plan's (round) order
        with contextlib.ExitStack() as stack:
            urls = {name: start(stack, i, name, spec)
                    for i, (name, spec, _) in enumerate(servers, 1)}
            for name, _, phase in servers:
                _warm_up(bench, urls[name], phase[0] if phase else calibration_cell())
            external = calibrate(urls["target"])
            for cell in todo:
                progress.cell(cell, bench.run_cell(cell, urls[cell.system.server]))
    else:  # one server at a time
        for i, (name, spec, phase) in enumerate(servers, 1):
            with contextlib.ExitStack() as stack:
                url = start(stack, i, name, spec)
                _warm_up(bench, url, phase[0])
                if name == "target":
                    external = calibrate(url)
                for cell in phase:
                    progress.cell(cell, bench.run_cell(cell, url))
    return {
        "meta": {
            "command": command, "started": started.isoformat(timespec="seconds"),
            "duration_s": round(time.perf_counter() - t_start, 1), "machine": _machine(),
            "pinning": (("every vLLM server up side by side, idle but one" if plan.interleaved
                         else "one vLLM server at a time") + " (every process of it) on CPU(s) "
                        f"{sorted(edge_cpus)}; the device farm and the closed-loop clients in the "
                        f"benchmark process on CPU(s) {sorted(device_cpus)}, torch with 1 thread"),
            "pair": pair_name,
            "pair_stats": {k: stats.get(k) for k in ("vocab_size", "target_params",
                                                       "draft_params", "flops_ratio", "alpha")},
            "plan": {k: (v if not isinstance(v, tuple) or not v or not isinstance(v[0], tuple)
                         else [f"{s.name} gamma {g}" for s, g in v])
                     for k, v in plan.__dict__.items()},
            "plain_step_ms": bench.step_ms,
            "device_draft_ms_per_token": draft_ms,
            "device_draft_ms_per_token_measured": measured_ms,
            "edge": {"num_speculative_tokens": EDGE_GAMMA_MAX, "verifier": "fused",
                     "draft_deadline_ms": "default", "intake": "adaptive (the 'intake wait' "
                     "systems: wait)", "colocated_gamma": COLOCATED_GAMMA},
            "external_check": external,
        },
        "records": bench.records,
    }


class _Progress:
    def __init__(self, total: int) -> None:
        self.done, self.total, self.t0 = 0, total, time.perf_counter()

    def line(self, text: str) -> None:
        self.done += 1
        eta = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
        print(f"[{self.done:3d}/{self.total}] {text}  (ETA {eta / 60:.1f} min)", flush=True)

    def cell(self, cell: Cell, rec: dict[str, Any]) -> None:
        self.line(f"{cell.label()}: {_summary(rec)}")


def _warm_up(bench: CapacityBench, url: str, cell: Cell) -> None:
    """A few requests first, so no cell pays for the server's first-request initialisation."""
    from dataclasses import replace

    plan = bench.plan
    bench.plan = replace(plan, warmup_s=0.0, min_window_s=2.0, max_window_s=2.0)
    try:
        bench.run_cell(replace(cell, experiment="warmup", num_devices=1, rtt_over_step=0.0), url)
    finally:
        bench.records = [r for r in bench.records if r["experiment"] != "warmup"]
        bench.plan = plan


def _external_check(bench: CapacityBench, url: str, pair: Any, logs: Path,
                    device_cpus: set[int]) -> dict[str, Any]:
    """target-only at 16 clients, no link: this benchmark's clients vs `vllm bench serve`."""
    from dataclasses import replace

    from vllm_tslt.bench.overhead import Plan as ServePlan
    from vllm_tslt.bench.overhead import bench_serve, summarise

    n = 16
    rec = bench.run_cell(Cell("external", TARGET_ONLY, "-", n, 0.0, 100.0), url)
    plan = ServePlan(input_len=8, output_len=bench.plan.max_tokens, prompts_per_client=3,
                     client_cpus=frozenset(device_cpus))
    result = summarise(bench_serve(url, pair.target, n, replace(plan),
                                   logs / "external-vllm-bench-serve.json", seed=1))
    out = {"num_clients": n, "this_benchmark": {
        "server_tokens_per_s": rec["server_tokens_per_s"], "tpot_p50_ms": rec["tpot_p50_ms"]},
        "vllm_bench_serve": result,
        "ratio": rec["server_tokens_per_s"] / result["output_throughput"]
        if result.get("output_throughput") else None}
    print(f"external check (target-only, {n} clients): this benchmark "
          f"{rec['server_tokens_per_s']:.1f} tok/s, vllm bench serve "
          f"{result['output_throughput']:.1f} tok/s", flush=True)
    return out


def _summary(rec: dict[str, Any]) -> str:
    acc, ci = rec["acceptance"], rec["acceptance_ci95"]
    tps, p95 = rec["server_tokens_per_s"], rec["tpot_p95_ms"]
    return (f"{tps:.1f} tok/s" if tps is not None else "no tokens") \
        + (f", TPOT p95 {p95:.1f} ms" if p95 is not None else "") \
        + (f", acceptance {acc:.3f} ± {ci:.3f} ({rec['acceptance_draft_tokens']} draft tokens)"
           if acc is not None and ci is not None else "") \
        + (f", farm lateness p50 {rec['farm']['lateness_ms_p50'] or 0:.2f} ms"
           if rec.get("farm") else "")


if __name__ == "__main__":
    raise SystemExit(main())
