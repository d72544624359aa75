"""The capacity benchmark's statistics: acceptance and its CI from the edge's per-round moments or
vLLM's per-position counters, /metrics parsing, the device farm's counters per cell, and the
merging of cells run in several rounds or pooled over a run (vllm_tslt.bench.capacity runs the
cells, capacity_report writes them up)."""

from __future__ import annotations

import math
import statistics
from typing import Any

Record = dict[str, Any]
MOMENTS = ("verify_rounds", "round_draft_tokens", "round_accepted", "round_accepted_sq",
           "round_accepted_x_draft", "round_draft_sq")  # the edge's per-round moments
# The edge's own time per step: waiting for drafts, and the proxy's work outside the wait.
EDGE_TIMES = ("draft_wait_microseconds", "proxy_overhead_microseconds", "proxy_steps")
# The intake policy's decisions (docs/intake.md, Metrics), request-steps or steps.
INTAKE = ("intake_waits", "intake_waited_requests", "intake_wait_misses", "intake_parks",
          "intake_parked_drafted", "intake_parked_plain", "intake_plain")
# The hub's own counts: drafts sent ahead, those a commit found waiting (the edge-side hit rate
# of scripts/predict_gpu.py), commits to paused devices held back.
HUB = ("drafts_ahead", "drafts_ahead_hits", "commits_held")
EDGE_COUNTERS = (*MOMENTS, *EDGE_TIMES, *INTAKE, *HUB)  # vllm_tslt_<name>_total on /metrics


def acceptance_from_moments(m: dict[str, float]) -> tuple[float | None, float | None, int]:
    """(acceptance, 95% CI half-width, draft tokens) from the edge's per-round moments
    (vllm_tslt_verify_rounds, Σd, Σa, Σa², Σad, Σd² on /metrics).

    Acceptance is the ratio Σa / Σd; rounds are the sampling units (the tokens of one round are
    not independent), so the CI is the ratio estimator's: 1.96 · sqrt(n/(n−1) · Σ(a − α̂d)²) / Σd,
    with Σ(a − α̂d)² = Σa² − 2α̂Σad + α̂²Σd²."""
    n, d = m.get("verify_rounds", 0.0), m.get("round_draft_tokens", 0.0)
    if n < 2 or d <= 0:
        return None, None, int(d)
    alpha = m["round_accepted"] / d
    resid = m["round_accepted_sq"] - 2 * alpha * m["round_accepted_x_draft"] \
        + alpha * alpha * m["round_draft_sq"]
    return alpha, 1.96 * math.sqrt(max(0.0, resid) * n / (n - 1)) / d, int(d)


def acceptance_from_positions(drafts: float, per_pos: list[float], gamma: int
                              ) -> tuple[float | None, float | None, int]:
    """The same from vLLM's counters for a fixed γ: ``drafts`` rounds and accepted counts per
    position (accepted length L ≥ j + 1 in per_pos[j] rounds), so the distribution of L, and with
    it the variance of the mean, is known exactly."""
    if drafts < 2 or gamma < 1:
        return None, None, int(drafts * gamma)
    mean = sum(per_pos) / drafts
    second = sum((2 * j + 1) * c for j, c in enumerate(per_pos)) / drafts
    var = max(0.0, second - mean * mean)
    return mean / gamma, 1.96 * math.sqrt(var / drafts) / gamma, int(drafts * gamma)


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spec_counters(metrics: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0, "steps": 0.0,
                           "per_pos": {}, **{k: 0.0 for k in EDGE_COUNTERS}}
    names = {"vllm:spec_decode_num_drafts_total": "drafts",
             "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens_total": "accepted",
             "vllm:iteration_tokens_total_count": "steps"}
    for key, value in metrics.items():
        name, _, labels = key.partition("{")
        if name in names:
            out[names[name]] += value
        elif name.startswith("vllm_tslt_") and \
                name[10:].removesuffix("_total") in EDGE_COUNTERS:
            out[name[10:].removesuffix("_total")] += value
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
            pos = int(labels.split('position="')[1].split('"')[0])
            out["per_pos"][pos] = out["per_pos"].get(pos, 0.0) + value
    return out


def counters_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = {k: after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted", "steps",
                                             *EDGE_COUNTERS)}
    out["per_pos"] = [after["per_pos"].get(j, 0.0) - before["per_pos"].get(j, 0.0)
                      for j in sorted(after["per_pos"])]
    return out



def system_key(r: Record) -> str:
    """'TSLT top-p gamma 4' etc.: the system and its γ (γ is part of what a user configures)."""
    return r["system"] if r["gamma"] in ("-", None) or not r["wire"] else \
        f"{r['system']} γ={r['gamma']}"


CELL_KEY = ("experiment", "system", "gamma", "num_devices", "rtt_over_step", "uplink_mbps")
MEDIAN_FIELDS = ("server_tokens_per_s", "tokens_per_s_per_client", "tpot_p50_ms", "tpot_p95_ms",
                 "ttft_p50_ms", "edge_step_ms", "draft_tokens_per_step", "edge_wait_ms_per_step",
                 "edge_proxy_ms_per_step")


def cell_key(r: Record) -> tuple[Any, ...]:
    return tuple(r.get(k) for k in CELL_KEY)


def merge_rounds(records: list[Record]) -> list[Record]:
    """One record per cell: a cell run in several rounds gets the median of each speed figure and
    the acceptance of its rounds pooled (their per-round moments summed), with ``rounds`` = how
    many. Cells run once are returned unchanged."""
    groups: dict[tuple[Any, ...], list[Record]] = {}
    for r in records:
        groups.setdefault(cell_key(r), []).append(r)
    out = []
    for rows in groups.values():
        if len(rows) == 1:
            out.append(rows[0])
            continue
        merged = {**rows[0], "rounds": len(rows)}
        for f in MEDIAN_FIELDS:
            xs = [r[f] for r in rows if r.get(f) is not None]
            merged[f] = statistics.median(xs) if xs else None
        moments = [r.get("acceptance_moments") for r in rows]
        if all(moments):
            pooled = {k: sum(m[k] for m in moments) for k in moments[0]}  # type: ignore[index]
            alpha, ci, tokens = acceptance_from_moments(pooled)
            merged.update(acceptance=alpha, acceptance_ci95=ci, acceptance_draft_tokens=tokens,
                          acceptance_rounds=int(pooled.get("verify_rounds", 0)),
                          acceptance_moments=pooled)
        out.append(merged)
    return out


def round_ratios(records: list[Record], field: str = "tokens_per_s_per_client"
                 ) -> dict[tuple[Any, ...], list[float]]:
    """Per repeated one-device cell: its ratio to target-only *of the same round* (servers side
    by side, cells of a round run back to back), one value per round."""
    out: dict[tuple[Any, ...], list[float]] = {}
    for r in records:
        if r["system"] == "target-only" or r.get("round") is None:
            continue
        base = [b for b in records if b["system"] == "target-only"
                and b.get("round") == r["round"] and b["experiment"] == r["experiment"]
                and b["num_devices"] == r["num_devices"] and b["rtt_over_step"] == r["rtt_over_step"]]
        if base and base[0].get(field) and r.get(field):
            out.setdefault(cell_key(r), []).append(r[field] / base[0][field])
    return {k: v for k, v in out.items() if len(v) > 1}


def pooled_acceptance(records: list[Record]) -> list[dict[str, Any]]:
    """Acceptance per TSLT system and γ, pooled over every cell of the run (their per-round
    moments summed): acceptance is a property of the pair and the truncation, not of N or the
    link, and a cell where speculation was mostly off verified too few drafts for its own CI."""
    groups: dict[str, list[dict[str, float]]] = {}
    for r in records:
        if r.get("acceptance_moments"):
            groups.setdefault(system_key(r), []).append(r["acceptance_moments"])
    out = []
    for key, moments in groups.items():
        pooled = {k: sum(m[k] for m in moments) for k in moments[0]}
        alpha, ci, tokens = acceptance_from_moments(pooled)
        if alpha is not None:
            out.append({"system": key, "cells": len(moments), "acceptance": alpha,
                        "acceptance_ci95": ci, "draft_tokens": tokens,
                        "rounds": int(pooled["verify_rounds"])})
    return sorted(out, key=lambda r: r["system"])


# The device farm's side of a cell: its devices' counters summed, bytes per token, the farm's loop.


def median_of(values: Any) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def sum_device_counters(stats: list[dict[str, Any]]) -> dict[str, int]:
    """Every device's counters (DraftRuntime.counters), summed over the cell's devices: drafts,
    sends ahead, branches and their bytes, pauses (whole run of the farm, warm-up included)."""
    out: dict[str, int] = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def uplink_bytes_per_token(stats: list[dict[str, Any]]) -> float | None:
    tokens = sum(s["draft_tokens_sent"] + s["ahead_tokens_sent"] + s["branch_tokens_sent"]
                 for s in stats)
    sent = sum(s["client"]["bytes_sent"] for s in stats)
    return sent / tokens if tokens else None


def farm_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = dict(after)
    for key in ("forwards", "states_extended", "overruns", "iterations"):
        out[key] = after[key] - before.get(key, 0)
    out["overrun_fraction"] = out["overruns"] / out["forwards"] if out["forwards"] else 0.0
    out["mean_batch"] = out["states_extended"] / out["forwards"] if out["forwards"] else None
    return out
