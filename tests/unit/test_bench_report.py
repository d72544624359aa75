"""The benchmark report: every section, table and plot from a small synthetic run, and the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_tslt.bench.report import fmt_num, fmt_speedup, main, write_report

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("## Targets", "## Links", "## Truncation sweep", "## Devices", "## Reading this report")
PLOTS = ("speedup_vs_uplink.png", "sweep.png", "devices.png")


def _record(experiment: str, system: str, **kw) -> dict:
    speculative = system != "target-only"
    rec = {
        "experiment": experiment, "system": system, "wire": None, "uplink_mbps": None,
        "downlink_mbps": None, "rtt_ms": None, "gamma": "4", "num_devices": 1, "top_k": None,
        "top_p": None, "candidates": 1,
        "bytes_per_draft_token": 24.0 if speculative else None,
        "acceptance": 0.43 if speculative else None,
        "mean_accepted_length": 1.7 if speculative else None,
        "tokens_per_s": 10.0, "server_tokens_per_s": 10.0, "latency_p50_s": 1.0,
        "latency_p95_s": 1.5, "ttft_p50_s": 0.1, "speedup_vs_target_only": 1.0,
        "edge_step_ms": 12.0, "edge_verify_ms_per_token": None, "requests": 4, "errors": 0,
    }
    rec.update(kw)
    return rec


def _data() -> dict:
    records = []
    for rtt in (5.0, 50.0):
        records.append(_record("links", "target-only", rtt_ms=rtt, downlink_mbps=100.0))
        for up in (1.0, 10.0):
            link = {"uplink_mbps": up, "downlink_mbps": 100.0, "rtt_ms": rtt}
            records.append(_record("links", "DSD fp16", wire="dsd-fp16", **link,
                                   bytes_per_draft_token=8203.0, acceptance=0.45,
                                   speedup_vs_target_only=0.25 * up / rtt * 5, tokens_per_s=3.0))
            for gamma, speedup in (("4", 1.234), ("auto", 1.4567)):
                records.append(_record("links", "TSLT top-K", wire="tslt", gamma=gamma, top_k=16,
                                       **link, speedup_vs_target_only=speedup, tokens_per_s=12.34))
    records.append(_record("links", "colocated draft_model", speedup_vs_target_only=1.8,
                           bytes_per_draft_token=None))
    for k, nbytes, acc in ((4, 14.0, 0.35), (16, 24.0, 0.43), (64, 72.0, 0.44)):
        records.append(_record("sweep", "TSLT top-K", top_k=k, bytes_per_draft_token=nbytes,
                               acceptance=acc))
    for p, nbytes in ((0.9, 30.0), (0.99, 90.0)):
        records.append(_record("sweep", "TSLT top-p", top_p=p, bytes_per_draft_token=nbytes))
    records.append(_record("sweep", "TSLT multi-candidate", top_k=16, candidates=2,
                           mean_accepted_length=None))
    records.append(_record("sweep", "TK-SLT", top_k=16, bytes_per_draft_token=70.0))
    records.append(_record("sweep", "DSD fp32", bytes_per_draft_token=16395.0, acceptance=0.45))
    for n in (1, 2, 4):
        records.append(_record("devices", "target-only", num_devices=n, server_tokens_per_s=10.0 * n))
        records.append(_record("devices", "TSLT top-K", num_devices=n, top_k=16,
                               server_tokens_per_s=13.0 * n, speedup_vs_target_only=1.3,
                               edge_verify_ms_per_token=0.5, errors=1 if n == 4 else 0))
    return {
        "meta": {
            "command": ".venv/bin/python -m vllm_tslt.bench.run --quick",
            "started": "2025-01-01T00:00:00", "duration_s": 1234.5,
            "machine": "2 cores (x86_64), 24 GiB, no GPU",
            "pinning": "edge on CPU 0; devices on CPU 1", "shaper": "token bucket in the proxy",
            "pair": "base",
            "pair_stats": {"vocab_size": 4096, "target_params": 6843648, "draft_params": 1212800},
            "quick": True, "max_tokens": 64, "requests_per_cell": 4, "temperature": 1.0,
            "notes": ["first note", "second | note"],
        },
        "records": records,
        "targets": [
            {"name": "uplink bytes vs DSD fp16", "value": "342× fewer", "goal": "≥ 100×", "met": True},
            {"name": "speedup at 1 Mbit/s", "value": "0.93×", "goal": "≥ 1.2×", "met": False},
            {"name": "GPU verify cost", "value": "not measured", "goal": "< 1 ms", "met": None},
        ],
    }


def _row(text: str, first_cell: str) -> str:
    """The table row of `text` that starts with `first_cell` (the first one, in document order)."""
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return line
    raise AssertionError(f"no row {first_cell!r} in the report")


def _section(text: str, heading: str) -> str:
    """From `heading` to the next heading of the same or a higher level (raises if it is missing)."""
    lines = text[text.index(heading + "\n"):].splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    for i, line in enumerate(lines[1:], start=1):
        hashes = len(line) - len(line.lstrip("#"))
        if 0 < hashes <= level and line[hashes:hashes + 1] == " ":
            return "\n".join(lines[:i])
    return "\n".join(lines)


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    blob = path.read_bytes()
    assert blob[:8] == PNG_MAGIC, path
    assert len(blob) > 1000, path  # a real plot, not an empty canvas


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    path = write_report(_data(), out)
    return path, path.read_text(encoding="utf-8")


def test_every_section_is_written_in_order(report) -> None:
    path, text = report
    assert path.name == "report.md"
    assert text.startswith("# ")
    positions = [text.index(s + "\n") for s in SECTIONS]  # raises if one is missing
    assert positions == sorted(positions)


def test_meta_block(report) -> None:
    _, text = report
    for expected in ("2 cores (x86_64), 24 GiB, no GPU", "edge on CPU 0; devices on CPU 1",
                     "token bucket in the proxy", "`base`", "vocab_size 4,096",
                     "target_params 6,843,648", ".venv/bin/python -m vllm_tslt.bench.run --quick",
                     "quick", "1,230 s", "- first note", "- second | note"):
        assert expected in text, expected


def test_targets_table(report) -> None:
    _, text = report
    section = _section(text, "## Targets")
    assert "| target | measured | goal | met |" in section
    assert _row(section, "uplink bytes vs DSD fp16").endswith("| ✅ |")
    assert _row(section, "speedup at 1 Mbit/s").endswith("| ❌ |")
    assert _row(section, "GPU verify cost").endswith("| — |")


def test_links_tables(report) -> None:
    _, text = report
    links = _section(text, "## Links")
    header = "| system | 1 Mbit/s × 5 ms | 10 Mbit/s × 5 ms | 1 Mbit/s × 50 ms | 10 Mbit/s × 50 ms |"
    assert links.count(header) == 4  # speedup and tokens/s, for each of the two γ settings
    fixed = _section(links, "### γ = 4 (fixed)")
    adaptive = _section(links, "### γ = auto (adaptive)")
    assert _row(fixed, "TSLT top-K") == "| TSLT top-K | 1.23× | 1.23× | 1.23× | 1.23× |"
    assert _row(adaptive, "TSLT top-K") == "| TSLT top-K | 1.46× | 1.46× | 1.46× | 1.46× |"
    # target-only never drafts: its one measurement per RTT fills every γ table at every uplink.
    assert _row(adaptive, "target-only") == "| target-only | 1× | 1× | 1× | 1× |"
    # The colocated draft has no network: the same value in every column.
    assert _row(fixed, "colocated draft_model").count("1.8×") == 4
    assert "| TSLT top-K | 12.3 | 12.3 | 12.3 | 12.3 |" in fixed
    assert "Downlink: 100 Mbit/s." in links


def test_links_bytes_and_acceptance_with_nulls(report) -> None:
    _, text = report
    table = _section(text, "### Bytes and acceptance")
    assert "| system | bytes / draft token | acceptance | mean accepted length |" in table
    assert _row(table, "target-only") == "| target-only | — | — | — |"
    assert _row(table, "DSD fp16, γ = 4") == "| DSD fp16, γ = 4 | 8,200 | 0.45 | 1.7 |"
    assert _row(table, "TSLT top-K, γ = auto") == "| TSLT top-K, γ = auto | 24 | 0.43 | 1.7 |"


def test_sweep_table(report) -> None:
    _, text = report
    sweep = _section(text, "## Truncation sweep")
    assert ("| system | γ | top-K | top-p | candidates | bytes / draft token | acceptance | "
            "mean accepted length | tokens/s |") in sweep
    assert "| TSLT top-K | 4 | 64 | — | 1 | 72 | 0.44 | 1.7 | 10 |" in sweep
    assert "| TSLT top-p | 4 | — | 0.99 | 1 | 90 | 0.43 | 1.7 | 10 |" in sweep
    assert "| TSLT multi-candidate | 4 | 16 | — | 2 | 24 | 0.43 | — | 10 |" in sweep
    assert "| DSD fp32 | 4 | — | — | 1 | 16,400 | 0.45 | 1.7 | 10 |" in sweep
    assert sweep.index("| DSD fp32 |") < sweep.index("| TK-SLT |") < sweep.index("| TSLT top-K |")


def test_devices_tables(report) -> None:
    _, text = report
    devices = _section(text, "## Devices")
    assert "| system | 1 device | 2 devices | 4 devices |" in devices
    assert "| TSLT top-K | 13 (1.3×) | 26 (1.3×) | 52 (1.3×) |" in devices
    assert "| TSLT top-K | 12 / 0.5 | 12 / 0.5 | 12 / 0.5 |" in devices
    assert "| target-only | 12 / — | 12 / — | 12 / — |" in devices
    assert "**1 of 24 requests failed**" in devices


def test_plots_are_pngs(report) -> None:
    path, text = report
    for name in PLOTS:
        _assert_png(path.parent / name)
        assert f"]({name})" in text


def test_missing_experiments_are_omitted(tmp_path) -> None:
    data = _data()
    data["records"] = [r for r in data["records"] if r["experiment"] == "sweep"]
    data["targets"] = []
    text = write_report(data, tmp_path).read_text(encoding="utf-8")
    assert "## Truncation sweep\n" in text and "## Reading this report\n" in text
    for absent in ("## Links", "## Devices", "## Targets"):
        assert absent not in text
    assert not (tmp_path / "speedup_vs_uplink.png").exists()
    assert not (tmp_path / "devices.png").exists()
    _assert_png(tmp_path / "sweep.png")


def test_records_are_required(tmp_path) -> None:
    with pytest.raises(ValueError, match="records"):
        write_report({"meta": {}}, tmp_path)


@pytest.mark.parametrize(("x", "text"), [
    (None, "—"), (float("nan"), "—"), (0.93, "0.93"), (1.23456, "1.23"), (12.345, "12.3"),
    (999.7, "1,000"), (4105.0, "4,100"), (16395.0, "16,400"), (0.000123456, "0.000123"),
    (4096, "4,096"), (0.0, "0"),
])
def test_three_significant_digits(x, text) -> None:
    assert fmt_num(x) == text


def test_speedup_format() -> None:
    assert fmt_speedup(0.93) == "0.93×"
    assert fmt_speedup(None) == "—"


def test_cli_regenerates_next_to_the_json(tmp_path, report, capsys) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_data()), encoding="utf-8")
    assert main([str(results)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == report[1]
    for name in PLOTS:
        _assert_png(tmp_path / name)


def test_cli_module_entry_point_with_out(tmp_path) -> None:
    data = copy.deepcopy(_data())
    data["records"] = [r for r in data["records"] if r["experiment"] == "devices"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_tslt.bench.report", str(results), "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## Devices\n" in text and "## Links" not in text
    _assert_png(out / "devices.png")
    assert not (tmp_path / "report.md").exists()
