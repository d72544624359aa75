"""The benchmark report's PNG plots (matplotlib's object API on an Agg canvas: no pyplot, no global
backend switch). Each returns the file written, or None when there is nothing to plot.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

from .report_format import (
    SYSTEM_ORDER,
    Record,
    RowKey,
    fmt_num,
    median,
    point_label,
    row_keys,
    row_label,
    row_of,
    system_rank,
)


def figure(ncols: int, width: float = 5.0, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # the dev extra installs it
        raise RuntimeError("the report's plots need matplotlib: pip install 'vllm-tslt[dev]'") from e
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def system_color(system: str) -> str:
    return f"C{system_rank(system)[0] % 10}" if system in SYSTEM_ORDER else "C9"


def log_x(ax) -> None:
    """Log x axis labelled in plain numbers (1, 10, 1,000), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_num(v)))


def save_png(fig, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=110)
    return path


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def plot_speedup_vs_uplink(records: Sequence[Record], path: pathlib.Path) -> pathlib.Path | None:
    linked = [r for r in records if r["uplink_mbps"] is not None
              and finite_or_none(r["speedup_vs_target_only"]) is not None]
    if not linked:
        return None
    rtts = sorted({r["rtt_ms"] for r in linked}, key=lambda t: (t is None, t or 0.0))
    fig, axes = figure(len(rtts))
    for ax, rtt in zip(axes, rtts):
        here = [r for r in linked if r["rtt_ms"] == rtt]
        for key in row_keys(here, with_gamma=True):
            mine = [r for r in here if row_of(r, key)]
            ups = sorted({r["uplink_mbps"] for r in mine})
            ys = [median(r["speedup_vs_target_only"] for r in mine if r["uplink_mbps"] == u)
                  for u in ups]
            ax.plot(ups, ys, marker="o", color=system_color(key[0]), label=row_label(key),
                    linestyle="-" if key[1] == "auto" else "--")
        ax.axhline(1.0, color="grey", linewidth=1, linestyle=":", label="target-only (1×)")
        log_x(ax)
        ax.set_title("no added RTT" if rtt is None else f"RTT {fmt_num(rtt)} ms")
        ax.set_xlabel("uplink (Mbit/s)")
        ax.set_ylabel("speedup vs target-only")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    return save_png(fig, path)


def plot_sweep(records: Sequence[Record], path: pathlib.Path) -> pathlib.Path | None:
    plotted = [r for r in records if finite_or_none(r["bytes_per_draft_token"]) is not None]
    if not plotted:
        return None
    with_gamma = len({str(r["gamma"]) for r in plotted}) > 1
    fig, axes = figure(2)
    panels = (("acceptance", "acceptance"), ("tokens_per_s", "tokens/s per request"))
    for ax, (field, ylabel) in zip(axes, panels):
        for key in row_keys(plotted, with_gamma):
            points = sorted(((r["bytes_per_draft_token"], finite_or_none(r[field]), point_label(r))
                             for r in plotted if row_of(r, key) and finite_or_none(r[field]) is not None),
                            key=lambda p: p[0])
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    color=system_color(key[0]), label=row_label(key))
            for x, y, label in points:
                if label:
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize="x-small")
        log_x(ax)
        ax.set_xlabel("bytes per draft token (log)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    return save_png(fig, path)


def plot_devices(records: Sequence[Record], keys: Sequence[RowKey],
                  path: pathlib.Path) -> pathlib.Path | None:
    if not any(finite_or_none(r["server_tokens_per_s"]) is not None for r in records):
        return None
    fig, axes = figure(1, width=6.0)
    ax = axes[0]
    for key in keys:
        mine = [r for r in records if row_of(r, key)]
        counts = sorted({r["num_devices"] for r in mine})
        ys = [median(r["server_tokens_per_s"] for r in mine if r["num_devices"] == n) for n in counts]
        ax.plot(counts, ys, marker="o", color=system_color(key[0]), label=row_label(key),
                linestyle="--" if key[1] and key[1] != "auto" else "-")
    ax.set_xticks(sorted({r["num_devices"] for r in records}))
    ax.set_xlabel("devices")
    ax.set_ylabel("server tokens/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)
