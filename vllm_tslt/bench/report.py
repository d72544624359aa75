"""Markdown report and PNG plots from a benchmark run's results (the runner's JSON).

    python -m vllm_tslt.bench.report RESULTS.json [--out DIR]

:func:`write_report` takes the runner's dict (``meta``, ``records``, ``targets``) and writes
``report.md`` plus one PNG per experiment present ("links", "sweep", "devices"); an experiment with
no records is left out. Nulls render as "—"; numbers keep 3 significant digits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

Record = dict[str, Any]
RowKey = tuple[str, str]  # (system, gamma); gamma is "" where it does not apply
Link = tuple[float | None, float | None]  # (uplink_mbps, rtt_ms)

NULL = "—"
# Row order of every table and legend; systems not listed follow in order of appearance.
SYSTEM_ORDER = (
    "target-only",
    "colocated draft_model",
    "tslt edge, no drafts",
    "DSD fp32",
    "DSD fp16",
    "TK-SLT",
    "TSLT top-K",
    "TSLT top-p",
    "TSLT multi-candidate",
)
# Systems that never draft: one measurement serves every γ table.
NON_SPECULATIVE = frozenset({"target-only", "tslt edge, no drafts"})
EXPERIMENTS = ("links", "sweep", "devices")

READING = (
    "**Bytes per draft token** is the uplink payload per draft token sent, framing included "
    "(message header, ids and lengths, not only the distribution). **Acceptance** is accepted draft "
    "tokens / draft tokens sent and verified; **mean accepted length** is accepted draft tokens per "
    "verified round. **Tokens/s** is the mean per-request generation rate; **server tokens/s** is all "
    "output tokens of a cell divided by its wall time. **Speedup** is a system's tokens/s divided by "
    "that of target-only vLLM measured in the same run, at the same RTT and number of devices "
    "(1.0× = no gain). Absolute times on a shared 2-core machine are noisy and depend on what else "
    "ran; read the ratios, not the absolute rates."
)


# ---------------------------------------------------------------------------------------------
# Formatting


def fmt_num(x: float | int | None) -> str:
    """3 significant digits, thousands separated; ints exact; None/NaN -> "—"."""
    if x is None or isinstance(x, bool):
        return NULL if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return NULL
    r = float(f"{x:.3g}")
    # NOTE: "g" would print 4,105 as "4.1e+03"; past 3 digits we print the rounded integer instead.
    return f"{r:,.0f}" if abs(r) >= 1000 else f"{r:.3g}"


def fmt_speedup(x: float | None) -> str:
    return NULL if x is None or not math.isfinite(x) else f"{fmt_num(x)}×"


def _md(text: Any) -> str:
    """A table cell: pipes escaped, newlines flattened."""
    return NULL if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: first column left-aligned, the rest right-aligned (they hold numbers)."""
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("| --- |" + " ---: |" * (len(header) - 1))
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


def _system_rank(system: str) -> tuple[int, str]:
    return (SYSTEM_ORDER.index(system), "") if system in SYSTEM_ORDER else (len(SYSTEM_ORDER), system)


def _gamma_label(gamma: str) -> str:
    return f"γ = {gamma} (adaptive)" if gamma == "auto" else f"γ = {gamma} (fixed)"


def _row_keys(records: Sequence[Record], with_gamma: bool) -> list[RowKey]:
    keys = {
        (r["system"], str(r["gamma"]) if with_gamma and r["system"] not in NON_SPECULATIVE else "")
        for r in records
    }
    return sorted(keys, key=lambda k: (_system_rank(k[0]), k[1] != "auto", k[1]))


def _row_label(key: RowKey) -> str:
    return f"{key[0]}, γ = {key[1]}" if key[1] else key[0]


def _row_of(record: Record, key: RowKey) -> bool:
    return record["system"] == key[0] and (not key[1] or str(record["gamma"]) == key[1])


def _errors_note(records: Sequence[Record]) -> list[str]:
    errors = sum(r.get("errors") or 0 for r in records)
    if not errors:
        return []
    total = sum(r.get("requests") or 0 for r in records)
    return [f"**{errors:,} of {total:,} requests failed** in this experiment; see the runner's log.", ""]


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on an Agg canvas: no pyplot, no global backend switch)


def _figure(ncols: int, width: float = 5.0, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # the dev extra installs it
        raise RuntimeError("the report's plots need matplotlib: pip install 'vllm-tslt[dev]'") from e
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _color(system: str) -> str:
    return f"C{_system_rank(system)[0] % 10}" if system in SYSTEM_ORDER else "C9"


def _log_x(ax) -> None:
    """Log x axis labelled in plain numbers (1, 10, 1,000), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_num(v)))


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=110)
    return path


def _num_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Header and targets


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    stats = meta.get("pair_stats") or {}
    pair = f"`{meta.get('pair', NULL)}`"
    if stats:
        pair += " (" + ", ".join(f"{k} {fmt_num(v)}" for k, v in stats.items()) + ")"
    duration = meta.get("duration_s")
    minutes = f" ({fmt_num(duration / 60)} min)" if duration is not None else ""
    kind = "quick (reduced grid and requests)" if meta.get("quick") else "full"
    lines = [
        f"- **Run:** {kind}, started {meta.get('started', NULL)}, took {fmt_num(duration)} s{minutes}",
        f"- **Machine:** {meta.get('machine', NULL)}",
        f"- **Pinning:** {meta.get('pinning', NULL)}",
        f"- **Links emulated by:** {meta.get('shaper', NULL)}",
        f"- **Model pair:** {pair}",
        f"- **Per cell:** {fmt_num(meta.get('requests_per_cell'))} requests, "
        f"max_tokens {fmt_num(meta.get('max_tokens'))}, "
        f"temperature {fmt_num(meta.get('temperature'))}",
        "",
        "Reproduce with:",
        "",
        "```bash",
        str(meta.get("command", NULL)),
        "```",
        "",
    ]
    notes = meta.get("notes") or []
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    return lines


def _targets_lines(targets: Sequence[dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    met = {True: "✅", False: "❌", None: NULL}
    rows = [(t["name"], t["value"], t["goal"], met[t.get("met")]) for t in targets]
    table = _table(["target", "measured", "goal", "met"], rows)
    # NOTE: the "met" column holds symbols, not numbers: centre it.
    table[1] = "| --- | ---: | --- | :---: |"
    return ["## Targets", "", *table, ""]


# ---------------------------------------------------------------------------------------------
# Links


def _link_columns(records: Sequence[Record]) -> list[Link]:
    """(uplink, rtt) pairs measured; a no-uplink system shows at every uplink of its RTT."""
    cols = {(r["uplink_mbps"], r["rtt_ms"]) for r in records if r["uplink_mbps"] is not None}
    rtts = {rtt for _, rtt in cols}
    cols |= {(None, r["rtt_ms"]) for r in records
             if r["uplink_mbps"] is None and r["rtt_ms"] is not None and r["rtt_ms"] not in rtts}
    if not cols:
        cols = {(None, None)}
    return sorted(cols, key=lambda c: (c[1] is None, c[1] or 0.0, c[0] is not None, c[0] or 0.0))


def _link_label(link: Link) -> str:
    up, rtt = link
    rtt_s = "no added RTT" if rtt is None else f"{fmt_num(rtt)} ms"
    if up is None:
        return "no network" if rtt is None else f"no uplink × {rtt_s}"
    return f"{fmt_num(up)} Mbit/s × {rtt_s}"


def _on_link(record: Record, link: Link) -> bool:
    if record["uplink_mbps"] is not None:
        return (record["uplink_mbps"], record["rtt_ms"]) == link
    # No uplink (target-only, colocated): the same measurement serves every uplink at its RTT.
    return record["rtt_ms"] is None or record["rtt_ms"] == link[1]


def _link_grid(records: Sequence[Record], links: Sequence[Link], field: str,
               fmt: Callable[[float | None], str]) -> list[str]:
    rows = []
    for key in _row_keys(records, with_gamma=False):
        mine = [r for r in records if _row_of(r, key)]
        rows.append([_row_label(key)] + [
            fmt(_median(r[field] for r in mine if _on_link(r, link))) for link in links
        ])
    return _table(["system", *(_link_label(link) for link in links)], rows)


def _links_section(records: Sequence[Record], out_dir: pathlib.Path) -> list[str]:
    links = _link_columns(records)
    downlinks = sorted({r["downlink_mbps"] for r in records if r.get("downlink_mbps") is not None})
    lines = [
        "## Links",
        "",
        "Each system over emulated links (columns: uplink × round-trip time). Downlink: "
        + (", ".join(f"{fmt_num(d)} Mbit/s" for d in downlinks) or NULL) + ".",
        "",
    ]
    drafting = [r for r in records if r["system"] not in NON_SPECULATIVE]
    gammas = sorted({str(r["gamma"]) for r in drafting}, key=lambda g: (g != "auto", g))
    for gamma in gammas or [""]:
        mine = [r for r in records if r["system"] in NON_SPECULATIVE or str(r["gamma"]) == gamma]
        if gamma:
            lines += [f"### {_gamma_label(gamma)}", ""]
        lines += ["Speedup vs target-only:", "", *_link_grid(mine, links, "speedup_vs_target_only",
                                                           fmt_speedup), ""]
        lines += ["Tokens/s per request:", "", *_link_grid(mine, links, "tokens_per_s", fmt_num), ""]
    lines += ["### Bytes and acceptance", "", "Median over links.", ""]
    rows = []
    for key in _row_keys(records, with_gamma=True):
        mine = [r for r in records if _row_of(r, key)]
        rows.append([_row_label(key), *(fmt_num(_median(r[f] for r in mine)) for f in
                     ("bytes_per_draft_token", "acceptance", "mean_accepted_length"))])
    lines += _table(["system", "bytes / draft token", "acceptance", "mean accepted length"], rows)
    lines += ["", *_errors_note(records)]
    if _plot_speedup_vs_uplink(records, out_dir / "speedup_vs_uplink.png"):
        lines += ["![speedup vs uplink](speedup_vs_uplink.png)", ""]
    return lines


def _plot_speedup_vs_uplink(records: Sequence[Record], path: pathlib.Path) -> pathlib.Path | None:
    linked = [r for r in records if r["uplink_mbps"] is not None
              and _num_or_none(r["speedup_vs_target_only"]) is not None]
    if not linked:
        return None
    rtts = sorted({r["rtt_ms"] for r in linked}, key=lambda t: (t is None, t or 0.0))
    fig, axes = _figure(len(rtts))
    for ax, rtt in zip(axes, rtts):
        here = [r for r in linked if r["rtt_ms"] == rtt]
        for key in _row_keys(here, with_gamma=True):
            mine = [r for r in here if _row_of(r, key)]
            ups = sorted({r["uplink_mbps"] for r in mine})
            ys = [_median(r["speedup_vs_target_only"] for r in mine if r["uplink_mbps"] == u)
                  for u in ups]
            ax.plot(ups, ys, marker="o", color=_color(key[0]), label=_row_label(key),
                    linestyle="-" if key[1] == "auto" else "--")
        ax.axhline(1.0, color="grey", linewidth=1, linestyle=":", label="target-only (1×)")
        _log_x(ax)
        ax.set_title("no added RTT" if rtt is None else f"RTT {fmt_num(rtt)} ms")
        ax.set_xlabel("uplink (Mbit/s)")
        ax.set_ylabel("speedup vs target-only")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Truncation sweep


def _point_label(r: Record) -> str:
    parts = []
    if r.get("top_k") is not None:
        parts.append(f"K={r['top_k']}")
    if r.get("top_p") is not None:
        parts.append(f"p={fmt_num(r['top_p'])}")
    if (r.get("candidates") or 1) > 1:
        parts.append(f"c={r['candidates']}")
    return ",".join(parts)


def _sweep_order(r: Record) -> tuple:
    k, p = r.get("top_k"), r.get("top_p")
    return (_system_rank(r["system"]), str(r["gamma"]), k is None, k or 0, p is None, p or 0.0,
            r.get("candidates") or 1)


def _sweep_section(records: Sequence[Record], out_dir: pathlib.Path) -> list[str]:
    rows = [
        [r["system"], str(r["gamma"]), fmt_num(r.get("top_k")), fmt_num(r.get("top_p")),
         fmt_num(r.get("candidates")), fmt_num(r["bytes_per_draft_token"]), fmt_num(r["acceptance"]),
         fmt_num(r["mean_accepted_length"]), fmt_num(r["tokens_per_s"])]
        for r in sorted(records, key=_sweep_order)
    ]
    lines = [
        "## Truncation sweep",
        "",
        "What each truncation costs on the uplink and what it keeps of acceptance.",
        "",
        *_table(["system", "γ", "top-K", "top-p", "candidates", "bytes / draft token", "acceptance",
                 "mean accepted length", "tokens/s"], rows),
        "",
        *_errors_note(records),
    ]
    if _plot_sweep(records, out_dir / "sweep.png"):
        lines += ["![truncation sweep](sweep.png)", ""]
    return lines


def _plot_sweep(records: Sequence[Record], path: pathlib.Path) -> pathlib.Path | None:
    plotted = [r for r in records if _num_or_none(r["bytes_per_draft_token"]) is not None]
    if not plotted:
        return None
    with_gamma = len({str(r["gamma"]) for r in plotted}) > 1
    fig, axes = _figure(2)
    panels = (("acceptance", "acceptance"), ("tokens_per_s", "tokens/s per request"))
    for ax, (field, ylabel) in zip(axes, panels):
        for key in _row_keys(plotted, with_gamma):
            points = sorted(((r["bytes_per_draft_token"], _num_or_none(r[field]), _point_label(r))
                             for r in plotted if _row_of(r, key) and _num_or_none(r[field]) is not None),
                            key=lambda p: p[0])
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    color=_color(key[0]), label=_row_label(key))
            for x, y, label in points:
                if label:
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize="x-small")
        _log_x(ax)
        ax.set_xlabel("bytes per draft token (log)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Devices


def _devices_section(records: Sequence[Record], out_dir: pathlib.Path) -> list[str]:
    with_gamma = len({str(r["gamma"]) for r in records if r["system"] not in NON_SPECULATIVE}) > 1
    keys = _row_keys(records, with_gamma)
    counts = sorted({r["num_devices"] for r in records})
    header = ["system", *(f"{n} device{'s' if n != 1 else ''}" for n in counts)]

    def grid(cell: Callable[[list[Record]], str]) -> list[str]:
        rows = []
        for key in keys:
            mine = [r for r in records if _row_of(r, key)]
            rows.append([_row_label(key)] + [cell([r for r in mine if r["num_devices"] == n])
                                             for n in counts])
        return _table(header, rows)

    def med(recs: list[Record], field: str) -> float | None:
        return _median(r[field] for r in recs)

    lines = [
        "## Devices",
        "",
        "Several devices drafting for one edge. Server tokens/s (speedup vs target-only with as many "
        "clients):",
        "",
        *grid(lambda rs: f"{fmt_num(med(rs, 'server_tokens_per_s'))} "
                         f"({fmt_speedup(med(rs, 'speedup_vs_target_only'))})" if rs else NULL),
        "",
        "Edge time: one engine step (ms) / verification per token (ms):",
        "",
        *grid(lambda rs: f"{fmt_num(med(rs, 'edge_step_ms'))} / "
                         f"{fmt_num(med(rs, 'edge_verify_ms_per_token'))}" if rs else NULL),
        "",
        *_errors_note(records),
    ]
    if _plot_devices(records, keys, out_dir / "devices.png"):
        lines += ["![server tokens/s vs devices](devices.png)", ""]
    return lines


def _plot_devices(records: Sequence[Record], keys: Sequence[RowKey],
                  path: pathlib.Path) -> pathlib.Path | None:
    if not any(_num_or_none(r["server_tokens_per_s"]) is not None for r in records):
        return None
    fig, axes = _figure(1, width=6.0)
    ax = axes[0]
    for key in keys:
        mine = [r for r in records if _row_of(r, key)]
        counts = sorted({r["num_devices"] for r in mine})
        ys = [_median(r["server_tokens_per_s"] for r in mine if r["num_devices"] == n) for n in counts]
        ax.plot(counts, ys, marker="o", color=_color(key[0]), label=_row_label(key),
                linestyle="--" if key[1] and key[1] != "auto" else "-")
    ax.set_xticks(sorted({r["num_devices"] for r in records}))
    ax.set_xlabel("devices")
    ax.set_ylabel("server tokens/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Entry points


SECTIONS = {"links": _links_section, "sweep": _sweep_section, "devices": _devices_section}


def write_report(data: dict, out_dir: pathlib.Path) -> pathlib.Path:
    """Write ``report.md`` and the plots into ``out_dir``; return the report's path."""
    if not isinstance(data.get("records"), list):
        raise ValueError("results must hold a 'records' list (the runner's JSON)")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[Record] = data["records"]
    unknown = {r.get("experiment") for r in records} - set(EXPERIMENTS)
    if unknown:
        logger.warning("report: ignoring records of unknown experiments %s", sorted(map(str, unknown)))
    lines = ["# vllm-tslt benchmark report", "", *_meta_lines(data.get("meta") or {})]
    lines += _targets_lines(data.get("targets") or [])
    for name in EXPERIMENTS:
        mine = [r for r in records if r.get("experiment") == name]
        if mine:
            lines += SECTIONS[name](mine, out_dir)
    lines += ["## Reading this report", "", READING, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_tslt.bench.report",
        description="Regenerate report.md and the plots from a benchmark run's JSON.")
    parser.add_argument("results", type=pathlib.Path, help="the runner's results JSON")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default: the JSON's folder)")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text(encoding="utf-8"))
    path = write_report(data, args.out or args.results.parent)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
