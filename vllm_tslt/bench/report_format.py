"""Shared by the benchmark report's sections and plots: number formats, Markdown tables, and how
records group into rows (one row per system, or per system and γ).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

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


def md_cell(text: Any) -> str:
    """A table cell: pipes escaped, newlines flattened."""
    return NULL if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: first column left-aligned, the rest right-aligned (they hold numbers)."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |"]
    lines.append("| --- |" + " ---: |" * (len(header) - 1))
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


def system_rank(system: str) -> tuple[int, str]:
    return (SYSTEM_ORDER.index(system), "") if system in SYSTEM_ORDER else (len(SYSTEM_ORDER), system)


def gamma_label(gamma: str) -> str:
    return f"γ = {gamma} (adaptive)" if gamma == "auto" else f"γ = {gamma} (fixed)"


def row_keys(records: Sequence[Record], with_gamma: bool) -> list[RowKey]:
    keys = {
        (r["system"], str(r["gamma"]) if with_gamma and r["system"] not in NON_SPECULATIVE else "")
        for r in records
    }
    return sorted(keys, key=lambda k: (system_rank(k[0]), k[1] != "auto", k[1]))


def row_label(key: RowKey) -> str:
    return f"{key[0]}, γ = {key[1]}" if key[1] else key[0]


def row_of(record: Record, key: RowKey) -> bool:
    return record["system"] == key[0] and (not key[1] or str(record["gamma"]) == key[1])


def errors_note(records: Sequence[Record]) -> list[str]:
    errors = sum(r.get("errors") or 0 for r in records)
    if not errors:
        return []
    total = sum(r.get("requests") or 0 for r in records)
    return [f"**{errors:,} of {total:,} requests failed** in this experiment; see the runner's log.", ""]


def point_label(r: Record) -> str:
    parts = []
    if r.get("top_k") is not None:
        parts.append(f"K={r['top_k']}")
    if r.get("top_p") is not None:
        parts.append(f"p={fmt_num(r['top_p'])}")
    if (r.get("candidates") or 1) > 1:
        parts.append(f"c={r['candidates']}")
    return ",".join(parts)


def sweep_order(r: Record) -> tuple:
    k, p = r.get("top_k"), r.get("top_p")
    return (system_rank(r["system"]), str(r["gamma"]), k is None, k or 0, p is None, p or 0.0,
            r.get("candidates") or 1)
