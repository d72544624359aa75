"""Markdown report and PNG plots from a benchmark run's results (the runner's JSON).

    python -m vllm_tslt.bench.report RESULTS.json [--out DIR]

:func:`write_report` takes the runner's dict (``meta``, ``records``, ``targets``) and writes
``report.md`` plus one PNG per experiment present ("links", "sweep", "devices"); an experiment with
no records is left out. Nulls render as "—"; numbers keep 3 significant digits.

The sections are here; number formats, Markdown tables and row grouping are in `report_format`,
the plots in `report_plots`.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from .report_format import (
    NON_SPECULATIVE,
    NULL,
    Link,
    Record,
    errors_note,
    fmt_num,
    fmt_speedup,
    gamma_label,
    md_table,
    median,
    row_keys,
    row_label,
    row_of,
    sweep_order,
)
from .report_plots import plot_devices, plot_speedup_vs_uplink, plot_sweep

__all__ = ["fmt_num", "fmt_speedup", "main", "write_report"]

logger = logging.getLogger(__name__)

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
    table = md_table(["target", "measured", "goal", "met"], rows)
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
    for key in row_keys(records, with_gamma=False):
        mine = [r for r in records if row_of(r, key)]
        rows.append([row_label(key)] + [
            fmt(median(r[field] for r in mine if _on_link(r, link))) for link in links
        ])
    return md_table(["system", *(_link_label(link) for link in links)], rows)


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
            lines += [f"### {gamma_label(gamma)}", ""]
        lines += ["Speedup vs target-only:", "", *_link_grid(mine, links, "speedup_vs_target_only",
                                                           fmt_speedup), ""]
        lines += ["Tokens/s per request:", "", *_link_grid(mine, links, "tokens_per_s", fmt_num), ""]
    lines += ["### Bytes and acceptance", "", "Median over links.", ""]
    rows = []
    for key in row_keys(records, with_gamma=True):
        mine = [r for r in records if row_of(r, key)]
        rows.append([row_label(key), *(fmt_num(median(r[f] for r in mine)) for f in
                     ("bytes_per_draft_token", "acceptance", "mean_accepted_length"))])
    lines += md_table(["system", "bytes / draft token", "acceptance", "mean accepted length"], rows)
    lines += ["", *errors_note(records)]
    if plot_speedup_vs_uplink(records, out_dir / "speedup_vs_uplink.png"):
        lines += ["![speedup vs uplink](speedup_vs_uplink.png)", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Truncation sweep


def _sweep_section(records: Sequence[Record], out_dir: pathlib.Path) -> list[str]:
    rows = [
        [r["system"], str(r["gamma"]), fmt_num(r.get("top_k")), fmt_num(r.get("top_p")),
         fmt_num(r.get("candidates")), fmt_num(r["bytes_per_draft_token"]), fmt_num(r["acceptance"]),
         fmt_num(r["mean_accepted_length"]), fmt_num(r["tokens_per_s"])]
        for r in sorted(records, key=sweep_order)
    ]
    lines = [
        "## Truncation sweep",
        "",
        "What each truncation costs on the uplink and what it keeps of acceptance.",
        "",
        *md_table(["system", "γ", "top-K", "top-p", "candidates", "bytes / draft token", "acceptance",
                 "mean accepted length", "tokens/s"], rows),
        "",
        *errors_note(records),
    ]
    if plot_sweep(records, out_dir / "sweep.png"):
        lines += ["![truncation sweep](sweep.png)", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Devices


def _devices_section(records: Sequence[Record], out_dir: pathlib.Path) -> list[str]:
    with_gamma = len({str(r["gamma"]) for r in records if r["system"] not in NON_SPECULATIVE}) > 1
    keys = row_keys(records, with_gamma)
    counts = sorted({r["num_devices"] for r in records})
    header = ["system", *(f"{n} device{'s' if n != 1 else ''}" for n in counts)]

    def grid(cell: Callable[[list[Record]], str]) -> list[str]:
        rows = []
        for key in keys:
            mine = [r for r in records if row_of(r, key)]
            rows.append([row_label(key)] + [cell([r for r in mine if r["num_devices"] == n])
                                             for n in counts])
        return md_table(header, rows)

    def med(recs: list[Record], field: str) -> float | None:
        return median(r[field] for r in recs)

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
        *errors_note(records),
    ]
    if plot_devices(records, keys, out_dir / "devices.png"):
        lines += ["![server tokens/s vs devices](devices.png)", ""]
    return lines


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
