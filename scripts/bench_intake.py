"""Intake policies side by side on the fake engine (real DraftHub, scripted devices, no vLLM).

    python scripts/bench_intake.py [--rounds 3] [--out docs/benchmarks/intake/results.json]

Two scenarios, every policy in each round (interleaved, so the box's drift hits all alike):
- ``slow+fast``: two devices, one answering at once, one 150 ms after each commit (7.5 steps of
  20 ms); does the slow one stall the fast one?
- ``late+plain``: a device 60 ms late (1.2 steps of 50 ms) next to a request without a device:
  does parking hide the lateness?
Policies: ``wait`` (the behaviour before intake), ``adaptive`` without parking, ``adaptive``.
Reported per run: the makespan, each request's finish time, engine steps, the hub's wait time and
the intake's decisions. Greedy outputs are checked against the target in every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from vllm_tslt.edge.intake import Intake
from vllm_tslt.testing.devices import TableDevice
from vllm_tslt.testing.engine import BatchEngine, Job
from vllm_tslt.testing.peers import VOCAB_SIZE, make_hub
from vllm_tslt.testing.targets import TableTarget

TOKENS = 48
SCENARIOS = {
    "slow+fast": dict(step_s=0.02, devices=[("fast", 0.0), ("slow", 0.15)],
                      jobs=[("fast", "fast", [1, 2, 3]), ("slow", "slow", [4, 5, 6])]),
    "late+plain": dict(step_s=0.05, devices=[("late", 0.06)],
                       jobs=[("late", "late", [1, 2, 3]), ("plain", None, [7, 8, 9])]),
}
POLICIES = {"wait": ("wait", 2), "adaptive-nopark": ("adaptive", 0), "adaptive": ("adaptive", 2)}


def run_once(scenario: dict, mode: str, max_park_steps: int) -> dict:
    target = TableTarget(VOCAB_SIZE, seed=0)
    hub = make_hub(draft_deadline_ms=300, intake=mode, intake_max_park_steps=max_park_steps)
    peers = [TableDevice(hub.endpoint, target, gamma=3, name=n, delay_s=d, seed=i).start()
             for i, (n, d) in enumerate(scenario["devices"])]
    sessions = {p.name: p.session_id for p in peers}
    try:
        engine = BatchEngine(hub, target, step_s=scenario["step_s"],
                             intake=Intake.from_config(hub.config))
        jobs = [Job(rid, sessions.get(dev or "", ""), prompt, TOKENS, temperature=0.0)
                for rid, dev, prompt in scenario["jobs"]]
        t0 = time.perf_counter()
        for job in jobs:
            engine.admit(job)
        finished: dict[str, float] = {}
        while engine.active:
            for rid, out in engine.step().finished.items():
                finished[rid] = round(time.perf_counter() - t0, 3)
                job = next(j for j in jobs if j.request_id == rid)
                assert out == target.greedy(job.prompt, TOKENS), rid
        snap = hub.snapshot()
        return {"makespan_s": max(finished.values()), "finish_s": finished,
                "steps": engine.stats.steps, "wait_ms": round(snap.get("wait_us", 0) / 1e3, 1),
                "drafted": engine.stats.drafted, "parked": engine.stats.parked,
                "intake": {k: v for k, v in snap.items() if k.startswith("intake_")}}
    finally:
        for p in peers:
            p.stop()
        hub.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="docs/benchmarks/intake/results.json")
    args = ap.parse_args()
    print("command:", " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), flush=True)
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for name, scenario in SCENARIOS.items():
            for policy, (mode, parks) in POLICIES.items():
                result = run_once(scenario, mode, parks)
                runs.append({"round": rnd, "scenario": name, "policy": policy, **result})
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for name, scenario in SCENARIOS.items():
        for policy in POLICIES:
            mine = [r for r in runs if r["scenario"] == name and r["policy"] == policy]
            summary[f"{name}/{policy}"] = {
                "makespan_s": _median_range([r["makespan_s"] for r in mine]),
                **{f"finish_{rid}_s": _median_range([r["finish_s"][rid] for r in mine])
                   for rid, _, _ in scenario["jobs"]},
                "wait_ms": _median_range([r["wait_ms"] for r in mine])}
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "summary": summary, "runs": runs}, indent=1))


def _median_range(xs: list[float]) -> list[float]:
    return [round(statistics.median(xs), 3), round(min(xs), 3), round(max(xs), 3)]


if __name__ == "__main__":
    main()
