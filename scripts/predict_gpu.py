"""What the design predicts for a GPU edge (issue 14), from the CPU capacity runs' measurements.

    python scripts/predict_gpu.py [--results R.json ...] [--out docs/benchmarks/gpu-prediction]

1. **The round model on this CPU.** For every one-device `intake: wait` cell (γ = 4) of the given
   capacity runs (default: the committed base-pair runs), the cell's measurements (acceptance,
   draft tokens per step, the edge's step and wait, the hit rate) go into
   `vllm_tslt.bench.round_prediction` and the model is set beside the cell's measured tokens/s
   over the same round's target-only cell. What the link and the modelled device do not explain
   of the measured wait is reported as ε, a residual.
2. **A GPU edge, predicted.** The same link and device in units of the target's step, the hit
   rate measured here, a GPU's verification cost (an H200's roofline: κ ≈ 0.005 per draft token,
   and 4× that as a margin), the edge's overhead measured by the overhead benchmark; with ε = 0
   and with ε as measured here; and the hit rate each of issue 14's one-device targets needs.

Nothing here is measured on a GPU: the GPU rows are the model's predictions, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from vllm_tslt.bench.round_prediction import (
    RoundCosts,
    alpha_from_acceptance,
    colocated_speedup,
    hit_needed,
    roofline_verify_cost,
    wait_speedup,
    with_hit,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = [ROOT / "docs/benchmarks/capacity-intake-base/results.json",
                   ROOT / "docs/benchmarks/capacity-targets-base/results.json"]
H200_HBM = 4.8e12  # bytes/s
H200_BF16 = 989e12  # dense FLOP/s
# The edge's plain step over target-only's: 1 / 0.968, the overhead benchmark's median for the
# edge without a device on the base pair at concurrency 1 (docs/benchmarks/overhead/report.md).
EDGE_OVERHEAD = 1 / 0.968
TARGETS = {0.5: 1.6, 2.0: 1.3}  # issue 14: RTT / step -> speedup over target-only, one device
GAMMA = 4
STEADY_DRAFTS = 3.5  # cells with fewer draft tokens per step had steps without one (deadlines)
# The co-located draft model's step over the target's on a GPU (assumed, not measured): its
# weights' share of the target's for a 1B/8B pair, and twice that for a launch-bound small model.
COLOCATED_DRAFT = (0.125, 0.25)


def _cells(paths: list[Path]) -> list[dict]:
    """One entry per one-device `intake: wait` cell, with the same round's target-only cell."""
    out = []
    for path in paths:
        records = json.loads(path.read_text())["records"]
        target = {(r["round"], r["rtt_over_step"]): r for r in records
                  if r["system"] == "target-only" and r.get("num_devices") == 1
                  and r["experiment"] == "capacity"}
        for r in records:
            if (r["experiment"] != "capacity" or r.get("num_devices") != 1
                    or "intake wait" not in r["system"] or str(r["gamma"]) != str(GAMMA)):
                continue
            t = target.get((r["round"], r["rtt_over_step"]))
            if t is None or not r.get("acceptance") or not r.get("edge_steps"):
                continue
            out.append(_measure(path, r, t))
    return out


def hit_rate(r: dict) -> tuple[float, str]:
    """(h, how it was measured). The hub's count of drafts a commit found waiting over the
    window's steps where the record has it; else the devices' count of commits that found their
    next draft already sent (ahead or a branch) over the commits they received, the whole farm
    run: an upper bound, since a draft sent before the commit reached the device may still reach
    the edge after the step began."""
    hub = r.get("hub") or {}
    if "drafts_ahead_hits" in hub:
        return min(1.0, hub["drafts_ahead_hits"] / r["edge_steps"]), "edge"
    c = r["device_counters"]
    return min(1.0, (c["ahead_hits"] + c["branch_hits"]) / max(c["commits"], 1)), "device"


def _measure(path: Path, r: dict, t: dict) -> dict:
    s = 1000.0 / t["server_tokens_per_s"]  # target-only ms per token (one request)
    d = r["draft_tokens_per_step"]
    hit, hit_source = hit_rate(r)
    step = (r["edge_plain_step_ms_reported"] + (r["edge_verify_ms_per_token"] or 0.0) * d) / s
    wait = r["edge_wait_ms_per_step"] / s
    rho, delta = r["rtt_ms"] / s, r["device_draft_ms_per_token"] / s
    alpha = alpha_from_acceptance(r["acceptance"], GAMMA)
    costs = RoundCosts(alpha=alpha, gamma=GAMMA, rtt=rho, draft=delta, overhead=step, hit=hit)
    return {
        "run": path.parent.name, "round": r["round"], "rtt_over_step": r["rtt_over_step"],
        "target_ms_per_token": s, "acceptance": r["acceptance"], "alpha": alpha,
        "draft_tokens_per_step": d, "steady": d >= STEADY_DRAFTS,
        "hit": hit, "hit_source": hit_source, "step": step, "wait": wait, "rho": rho,
        "delta": delta,
        # the residual: what the link and the device do not explain of a miss's wait
        "extra": max(0.0, wait / (1.0 - hit) - (rho + GAMMA * delta)) if hit < 1 else 0.0,
        "measured": r["server_tokens_per_s"] / t["server_tokens_per_s"],
        # bookkeeping: the measured tokens per step over the measured step and wait
        "accounted": (1.0 + r["acceptance"] * d) / (step + wait),
        "model": wait_speedup(costs),  # E(α) and the link and device alone (ε = 0)
    }


def _held_out_alpha(paths: list[Path]) -> float:
    """The pair's E Σ min(p, q) on held-out text as the runs' pair build measured it (median)."""
    return statistics.median(json.loads(p.read_text())["meta"]["pair_stats"]["alpha"]
                             for p in paths)


def _predict(cells: list[dict], held_out_alpha: float) -> dict:
    steady = [c for c in cells if c["steady"]]
    hit = statistics.median(c["hit"] for c in steady)
    extra = statistics.median(c["extra"] for c in steady)
    delta = statistics.median(c["delta"] for c in steady)
    alpha = statistics.median(c["alpha"] for c in steady)
    kappa = roofline_verify_cost(H200_HBM, H200_BF16)
    rows, many = [], []
    for rho, goal in TARGETS.items():
        for a, a_name in ((alpha, "sampled text, measured"), (held_out_alpha, "held-out text")):
            for k, k_name in ((kappa, "roofline"), (4 * kappa, "4x roofline")):
                for e, e_name in ((0.0, "0"), (extra, "as measured here")):
                    costs = RoundCosts(alpha=a, gamma=GAMMA, rtt=rho, draft=delta, verify=k,
                                       overhead=EDGE_OVERHEAD, extra=e, hit=hit)
                    rows.append({
                        "rtt_over_step": rho, "target": goal, "alpha": a, "alpha_source": a_name,
                        "verify": k, "verify_source": k_name, "extra": e, "extra_source": e_name,
                        "wait": wait_speedup(costs), "all_hits": wait_speedup(with_hit(costs, 1)),
                        "hit_needed": hit_needed(costs, goal)})
            costs = RoundCosts(alpha=a, gamma=GAMMA, rtt=rho, draft=delta, verify=kappa,
                               overhead=EDGE_OVERHEAD, hit=hit)
            many.append({"alpha": a, "rtt_over_step": rho, "tslt": wait_speedup(costs),
                         "colocated": {str(x): colocated_speedup(costs, x)
                                       for x in COLOCATED_DRAFT}})
    return {"hit": hit, "extra": extra, "delta": delta, "alpha": alpha, "kappa": kappa,
            "overhead": EDGE_OVERHEAD, "steady_cells": len(steady),
            "steady_rtts": sorted({c["rtt_over_step"] for c in steady}), "rows": rows,
            "many_devices": many}


def _sixteen(paths: list[Path]) -> list[dict]:
    """The measured 16-device cells of the runs (server tokens/s over target-only's)."""
    out = []
    for path in paths:
        records = [r for r in json.loads(path.read_text())["records"]
                   if r.get("num_devices") == 16 and r["experiment"] == "capacity"]
        target = {r["rtt_over_step"]: r["server_tokens_per_s"] for r in records
                  if r["system"] == "target-only"}
        for r in records:
            if r["system"] != "target-only" and r["rtt_over_step"] in target:
                out.append({"run": path.parent.name, "system": r["system"], "gamma": r["gamma"],
                            "rtt_over_step": r["rtt_over_step"],
                            "ratio": r["server_tokens_per_s"] / target[r["rtt_over_step"]]})
    return out


def _fmt_hit(h: float) -> str:
    return "unreachable" if h == float("inf") else f"{h:.2f}"


def _model_section(cells: list[dict], pred: dict) -> list[str]:
    lines = [
        "## 1. The model against this CPU's measurements", "",
        f"Every one-device `intake: wait` cell (γ = {GAMMA}) of the runs. *s*: target-only ms per "
        "token in the same round; *acceptance*: accepted ÷ drafted tokens (the record's); *α*: "
        "the per-position acceptance that gives it in i.i.d. rounds of γ; *h*: drafts already "
        "waiting (`hit_rate`: the hub's count where the record has it, else the devices' upper "
        "bound); *step*, *wait*: the edge's reported plain step plus verification, and its wait, "
        "per step in units of s; *measured*: tokens/s over the round's target-only; *accounted*: "
        "the cell's own tokens per step over its step + wait (bookkeeping: it checks that no "
        "term is missing, not the model); *model*: E(α) over step + (1 − h)(ρ + γ·δ), the link "
        "and the device alone; ε: the rest of the measured wait per miss, in steps (a residual: "
        "with it the model equals the measured wait by construction).", "",
        "| run | round | RTT/step | s ms | acceptance | α | draft tok/step | h | step | wait | ε "
        "| measured | accounted | model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        mark = "" if c["steady"] else " †"
        lines.append(
            f"| {c['run']} | {c['round']} | {c['rtt_over_step']} | {c['target_ms_per_token']:.1f} "
            f"| {c['acceptance']:.3f} | {c['alpha']:.3f} | {c['draft_tokens_per_step']:.2f}{mark} "
            f"| {c['hit']:.2f} ({c['hit_source']}) | {c['step']:.2f} | {c['wait']:.2f} "
            f"| {c['extra']:.2f} | {c['measured']:.2f} | {c['accounted']:.2f} "
            f"| {c['model']:.2f} |")
    steady = [c for c in cells if c["steady"]]
    acc = [c["accounted"] / c["measured"] for c in cells]
    mod = [c["model"] / c["measured"] for c in steady]
    lines += [
        "",
        f"† fewer than {STEADY_DRAFTS} draft tokens per step: steps went without a draft "
        "(deadlines), which the model does not describe; left out of the medians below.", "",
        f"- accounted ÷ measured: median {statistics.median(acc):.2f} "
        f"(range {min(acc):.2f}–{max(acc):.2f}), {len(cells)} cells;",
        f"- model (ε = 0) ÷ measured: median {statistics.median(mod):.2f} "
        f"(range {min(mod):.2f}–{max(mod):.2f}), {len(steady)} cells: the link and the modelled "
        f"device explain part of the wait only; the rest, ε, is a median {pred['extra']:.2f} "
        "steps per miss on this box (the emulated link hands frames over between the device "
        "loop's forward passes, the farm shares a core with the clients: "
        "docs/benchmarks/branches/report.md). It is not explained further here.", ""]
    return lines


def _prediction_section(pred: dict) -> list[str]:
    lines = [
        "## 2. Predicted for a GPU edge (not measured)", "",
        f"Same link and device in units of the target's step as the CPU runs: δ = "
        f"{pred['delta']:.3f} steps per draft token (the farm's modelled device), h = "
        f"{pred['hit']:.2f} (the median above), γ = {GAMMA}; o = {pred['overhead']:.3f} (the "
        "overhead benchmark's edge without a device, base pair, concurrency 1); κ = "
        f"{pred['kappa']:.4f} per draft token is an H200's roofline (4.8 TB/s over 989 TFLOP/s "
        "bf16: one more token of a memory-bound decode step), 4× that a margin for kernels "
        "below the roofline; α: the median per-position α of the steady cells above, and the "
        "pair's held-out α (its build's E Σ min(p, q)). *all hits*: h = 1; *h needed*: the hit "
        "rate at which waiting reaches the issue's target. The steady cells behind h and ε ran "
        f"at RTT / step {', '.join(str(r) for r in pred['steady_rtts'])} only; rows at other "
        "RTTs carry those over.", "",
        "| RTT/step | target | α | κ | ε | speedup | all hits | h needed |",
        "|---:|---:|---|---|---|---:|---:|---:|"]
    for r in pred["rows"]:
        lines.append(
            f"| {r['rtt_over_step']} | {r['target']}× | {r['alpha']:.3f} ({r['alpha_source']}) "
            f"| {r['verify']:.4f} ({r['verify_source']}) | {r['extra']:.2f} "
            f"({r['extra_source']}) | {r['wait']:.2f} | {r['all_hits']:.2f} "
            f"| {_fmt_hit(r['hit_needed'])} |")
    return [*lines, ""]


def _sixteen_section(pred: dict, sixteen: list[dict]) -> list[str]:
    d1, d2 = COLOCATED_DRAFT
    lines = [
        "### 16 devices", "",
        "The adaptive intake parks a request whose draft is late and the batch runs on; on an "
        "edge whose step does not grow with the batch (a memory-bound decode) each request keeps "
        "its one-device speedup (ε = 0, κ at the roofline, below). A parked request keeps its "
        "place among vLLM 0.32's running requests and its KV blocks, so it frees no batch slot. "
        "vLLM's co-located `draft_model` pays no round trip; its draft step is assumed at "
        f"{d1} or {d2} of the target's (not measured).", "",
        f"| α | RTT/step | TSLT | co-located ({d1}) | co-located ({d2}) |",
        "|---:|---:|---:|---:|---:|"]
    for m in pred["many_devices"]:
        lines.append(f"| {m['alpha']:.3f} | {m['rtt_over_step']} | {m['tslt']:.2f} | "
                     f"{m['colocated'][str(d1)]:.2f} | {m['colocated'][str(d2)]:.2f} |")
    lines += ["", "Measured on this CPU at 16 devices (server tokens/s over target-only's, one "
              "run each):", "", "| run | system | γ | RTT/step | ratio |", "|---|---|---|---:|---:|"]
    lines += [f"| {x['run']} | {x['system']} | {x['gamma']} | {x['rtt_over_step']} | "
              f"{x['ratio']:.2f} |" for x in sixteen]
    return [*lines, ""]


def _reading_section(cells: list[dict], pred: dict, adaptive_hits: list[float]) -> list[str]:
    steady = [c for c in cells if c["steady"]]
    step = statistics.median(c["step"] for c in steady)
    wait = statistics.median(c["wait"] for c in steady)
    gpu_step = pred["overhead"] + GAMMA * pred["kappa"]
    return [
        "## Reading it", "",
        f"- On this CPU a waited-for round costs a step of {step:.2f} target steps (median: "
        f"the edge's plain step with the verification of ~{GAMMA} draft tokens) plus a wait of "
        f"{wait:.2f} (median). A GPU edge's step is predicted at {gpu_step:.2f}; the wait, in "
        "units of the step, stays what the link, the device and ε make it.",
        "- The table gives, per target, the speedup the same design is predicted to reach on "
        "a GPU edge and the share h of drafts that must already be at the edge before their "
        "step (send-ahead's job). That hit rate, and ε on a real network, are what a GPU "
        "measurement should check first.",
        "- The model covers `intake: wait`. Under the adaptive intake a miss decodes plainly and "
        "the device's context then moves one token per step, so its hit rate is another "
        f"quantity (`hit_rate` in those cells: {min(adaptive_hits):.2f}–"
        f"{max(adaptive_hits):.2f}, {len(adaptive_hits)} cells); no adaptive prediction is "
        "made.", ""]


def _report(cells: list[dict], pred: dict, sixteen: list[dict], adaptive_hits: list[float],
            command: str) -> str:
    head = [
        "# What the design predicts for a GPU edge (issue 14)", "", f"Command: `{command}`", "",
        "The round model (`vllm_tslt/bench/round_prediction.py`): a drafted round emits "
        "E(γ) = (1 − α^(γ+1)) / (1 − α) tokens (α per position) in one edge step of o + κ·γ "
        "plain steps, plus, when its draft was not already at the edge (probability 1 − h), a "
        "wait of ρ + γ·δ + ε (RTT, drafting, lateness beyond both), all in units of "
        "target-only's step.", ""]
    return "\n".join(head + _model_section(cells, pred) + _prediction_section(pred)
                     + _sixteen_section(pred, sixteen)
                     + _reading_section(cells, pred, adaptive_hits))


def _adaptive_hits(paths: list[Path]) -> list[float]:
    """The devices' hit rate (`hit_rate`) in the one-device cells with the adaptive intake."""
    return [hit_rate(r)[0] for path in paths for r in json.loads(path.read_text())["records"]
            if r["experiment"] == "capacity" and r.get("num_devices") == 1
            and r.get("device_counters") and "intake wait" not in r["system"]
            and r.get("edge_steps")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, nargs="+", default=DEFAULT_RESULTS,
                   help="capacity benchmark results.json files (default: the base-pair runs)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/gpu-prediction")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.results if not f.exists()]
    if missing:
        print(f"predict_gpu: no such results file: {', '.join(missing)} (--results)",
              file=sys.stderr)
        return 2
    cells = _cells(args.results)
    if not any(c["steady"] for c in cells):
        print(f"predict_gpu: no one-device `intake: wait` cell with γ = {GAMMA} and "
              f"≥ {STEADY_DRAFTS} draft tokens per step in the results given "
              "(run scripts/bench_capacity.py --intake)", file=sys.stderr)
        return 2
    pred = _predict(cells, _held_out_alpha(args.results))
    sixteen = _sixteen(args.results)
    adaptive_hits = _adaptive_hits(args.results) or [float("nan")]
    inputs = [str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f) for f in args.results]
    command = "python scripts/predict_gpu.py" + (
        "" if args.results == DEFAULT_RESULTS else " --results " + " ".join(inputs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": {"command": command, "written": datetime.now(timezone.utc).isoformat(),
                  "inputs": inputs},
         "cells": cells, "prediction": pred, "sixteen_devices": sixteen,
         "adaptive_hit_rates": adaptive_hits}, indent=1, default=str))
    (args.out / "report.md").write_text(
        _report(cells, pred, sixteen, adaptive_hits, command))
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
