#!/usr/bin/env python
"""Profile the edge's engine process under a device farm: where does a step's time go?

Starts one tslt edge (`intake` as given) on --edge-cpus, runs one capacity-benchmark cell (N farm
devices drafting with TSLT top-p, closed-loop clients, an emulated link of RTT = --rtt × the plain
step) from this process on --device-cpus, and samples the model-runner worker (or the EngineCore)
with py-spy
(`--threads`, so the engine thread and the draft hub's I/O thread are told apart) for the cell's
window. Writes the raw collapsed stacks and a summary (per thread: samples; the functions with the
most inclusive and self samples) to --out.

Reproduce: `.venv/bin/python scripts/profile_edge.py --pair base --devices 16 --rtt 2`
(py-spy from PyPI: `pip install py-spy`; needs ptrace rights over the server, e.g. as its user).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from vllm_tslt.bench.capacity import CapacityBench, Cell, Plan
from vllm_tslt.bench.runner import EDGE_ALONE, TSLT_P


def server_process(root: int, which: str) -> int:
    """The pid of vLLM's EngineCore process below ``root`` (the server is a child of this
    process), or with ``which="worker"`` of its model-runner worker (where the proposer and the
    draft hub live): the EngineCore's child that is not multiprocessing's resource tracker."""
    import psutil

    def cmd(proc: psutil.Process) -> str:
        try:
            return " ".join(proc.cmdline()) + " " + proc.name()
        except psutil.Error:
            return ""

    core = next((p for p in psutil.Process(root).children(recursive=True)
                 if "EngineCore" in cmd(p)), None)
    if core is None:
        raise RuntimeError(f"no EngineCore process below pid {root}")
    if which == "engine":
        return core.pid
    worker = next((p for p in core.children(recursive=True)
                   if "resource_tracker" not in cmd(p)), None)
    if worker is None:
        raise RuntimeError(f"no worker process below EngineCore {core.pid}")
    return worker.pid


def summarise(raw: Path, top: int = 25) -> dict:
    """py-spy's raw format: one line per distinct stack, 'frame;frame;... count'."""
    threads: collections.Counter = collections.Counter()
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self_: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        threads[thread] += n
        for frame in set(frames[1:]):
            inclusive[thread][frame] += n
        if len(frames) > 1:
            self_[thread][frames[-1]] += n
    return {"threads": dict(threads.most_common()),
            "inclusive": {t: inclusive[t].most_common(top) for t, _ in threads.most_common(4)},
            "self": {t: self_[t].most_common(top) for t, _ in threads.most_common(4)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="base")
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--rtt", type=float, default=2.0, help="RTT / plain step")
    parser.add_argument("--step-ms", type=float, default=15.5,
                        help="the plain step the RTT multiplies (the targets run measured 15.5 ms "
                             "on the base pair)")
    parser.add_argument("--gamma", default="4")
    parser.add_argument("--intake", default="adaptive")
    parser.add_argument("--alone", action="store_true",
                        help="the same clients without devices (no sessions): the baseline")
    parser.add_argument("--device-draft-ms-per-token", type=float, default=1.95)
    parser.add_argument("--seconds", type=float, default=25.0, help="profiled window")
    parser.add_argument("--edge-cpus", default="0")
    parser.add_argument("--device-cpus", default="1")
    parser.add_argument("--process", choices=("worker", "engine"), default="worker",
                        help="the model-runner worker (proposer, draft hub) or the EngineCore "
                             "(scheduler)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vllm-tslt-profile"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_tslt.edge.launch import free_port, vllm_server
    from vllm_tslt.models.pairs import ensure_pair

    args.out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {int(c) for c in args.device_cpus.split(",")})
    sys.setswitchinterval(0.001)
    pair = ensure_pair(args.pair)
    hub = f"tcp://127.0.0.1:{free_port()}"
    plan = replace(Plan.make(), warmup_s=3.0, min_window_s=args.seconds,
                   max_window_s=args.seconds)
    bench = CapacityBench(pair, plan, hub, args.device_draft_ms_per_token)
    bench.step_ms = args.step_ms
    spec = {"method": "tslt", "num_speculative_tokens": 8, "bind": hub, "verifier": "fused",
            "max_candidates": 1, "intake": args.intake}
    cell = Cell("capacity", EDGE_ALONE if args.alone else TSLT_P, "-" if args.alone else args.gamma,
                args.devices, args.rtt, 10.0)
    with vllm_server(pair.target, args.out / "server.log", spec,
                     cpus={int(c) for c in args.edge_cpus.split(",")}, max_model_len=512,
                     extra_args=["--max-num-seqs", str(max(64, 2 * args.devices))]) as url:
        pid = server_process(os.getpid(), args.process)
        print(f"profiling {args.process} pid {pid}", flush=True)
        raw = args.out / f"{args.process}.txt"
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        spy = subprocess.Popen([py_spy, "record", "-p", str(pid), "--threads", "--nonblocking",
                                "-r", "200", "-f", "raw", "-o", str(raw),
                                "-d", str(int(args.seconds + 10))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(1.0)
        rec = bench.run_cell(cell, url)
        spy.wait(timeout=120)
    if spy.returncode != 0 or not raw.exists():
        raise SystemExit(f"py-spy exited with {spy.returncode} and wrote no profile: it needs "
                         "ptrace rights over the server (run as its user, or as root)")
    summary = {"cell": cell.label(), "record": {k: rec[k] for k in (
        "server_tokens_per_s", "tpot_p50_ms", "edge_step_ms", "draft_tokens_per_step",
        "edge_wait_ms_per_step", "edge_proxy_ms_per_step", "intake")}, **summarise(raw)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["record"], indent=1))
    for thread, n in summary["threads"].items():
        print(f"{n:7d} samples  {thread}")
    for thread, rows in summary["self"].items():
        print(f"\n== self samples, {thread}")
        for frame, n in rows[:15]:
            print(f"{n:7d}  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
