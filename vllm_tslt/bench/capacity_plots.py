"""The capacity report's plots (PNG): server tokens/s vs devices, speedup vs RTT/step, capacity
at the SLO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_tslt.bench.capacity_report import (
    BASELINES,
    _find,
    _ordered_systems,
    capacity_at_slo,
    sweep_table,
)
from vllm_tslt.bench.capacity_stats import system_key
from vllm_tslt.bench.report_plots import figure

# ---------------------------------------------------------------------------------------------


def write_plots(data: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    for fn in (_plot_tokens_vs_devices, _plot_speedup_vs_rtt, _plot_capacity_bars):
        p = fn(data, out)
        if p is not None:
            paths.append(p)
    return paths


def _plot_tokens_vs_devices(data: dict[str, Any], out: Path) -> Path | None:
    cap = _find(data["records"], experiment="capacity")
    rtts = sorted({r["rtt_over_step"] for r in cap})
    if not rtts:
        return None
    fig, axes = figure(len(rtts))
    for ax, rtt in zip(axes, rtts):
        rows = [r for r in cap if r["rtt_over_step"] == rtt]
        for i, key in enumerate(_ordered_systems(rows)):
            mine = sorted((r for r in rows if system_key(r) == key and r["server_tokens_per_s"]),
                          key=lambda r: r["num_devices"])
            ax.plot([r["num_devices"] for r in mine], [r["server_tokens_per_s"] for r in mine],
                    marker="o", label=key, color=f"C{i}",
                    linestyle="--" if key in BASELINES else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices (closed-loop clients)")
        ax.set_ylabel("server tokens/s")
        ax.set_title(f"RTT = {rtt:g} × plain step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    path = out / "tokens_vs_devices.png"
    fig.savefig(path, dpi=110)
    return path


def _plot_speedup_vs_rtt(data: dict[str, Any], out: Path) -> Path | None:
    rows = [r for r in sweep_table(data) if r["speedup"] is not None]
    if not rows:
        return None
    fig, axes = figure(1)
    ax = axes[0]
    for i, (gamma, up) in enumerate(sorted({(r["gamma"], r["uplink_mbps"]) for r in rows})):
        mine = sorted((r for r in rows if r["gamma"] == gamma and r["uplink_mbps"] == up),
                      key=lambda r: r["rtt_over_step"])
        ax.plot([r["rtt_over_step"] for r in mine], [r["speedup"] for r in mine], marker="o",
                color=f"C{i}", label=f"γ={gamma}, {up:g} Mbit/s up")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("RTT / edge plain step")
    ax.set_ylabel("tokens/s ÷ target-only (one device)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "speedup_vs_rtt.png"
    fig.savefig(path, dpi=110)
    return path


def _plot_capacity_bars(data: dict[str, Any], out: Path) -> Path | None:
    rows = capacity_at_slo(data)
    if not rows:
        return None
    rtts = sorted({r["rtt_over_step"] for r in rows})
    fig, axes = figure(len(rtts))
    for ax, rtt in zip(axes, rtts):
        mine = [r for r in rows if r["rtt_over_step"] == rtt]
        ax.barh([r["system"] for r in mine], [r["server_tokens_per_s"] or 0 for r in mine],
                color=[f"C{i}" for i in range(len(mine))])
        for y, r in enumerate(mine):
            ax.text(0, y, f" N={r['max_devices'] if r['max_devices'] is not None else 'none'}",
                    va="center", fontsize=7)
        ax.set_xlabel("server tokens/s at the largest N within the SLO")
        ax.set_title(f"RTT = {rtt:g} × step")
    path = out / "capacity_at_slo.png"
    fig.savefig(path, dpi=110)
    return path
