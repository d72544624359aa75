#!/usr/bin/env python
"""Draft codec speed and size (issue 16): encode/decode µs of one γ = 4 draft, this codec side by
side with another git revision's (the baseline), in one run -> docs/benchmarks/codec/.

    python scripts/bench_codec.py                          # baseline: the v1 codec (e05c637)
    python scripts/bench_codec.py --baseline-ref none      # this codec only
    python scripts/bench_codec.py --baseline-ref 5bbb4e8 --engine-devices 16 64
        # item 3 (codec speed): against the entropy codec before it, and what decoding 16 / 64
        # devices' drafts in the hub's I/O thread costs a stand-in engine step (shared GIL)

Where numba is installed the current codec encodes and decodes drafts with its compiled loops
(vllm_tslt/protocol/compiled.py, compiled before timing); "current, numpy codec" is the same
codec with the numpy reference (a machine without numba, e.g. a device that did not install it).

Each cell times `repeats` calls, `rounds` times, alternating baseline and current codec per round
(this 2-core box is shared and noisy), and reports the median round: wall time and thread CPU time
(the CPU time is what the call costs when the machine is not also busy with something else).
Drafts come from Gaussian logits (mean entropy ~2 nats) through the real sparsify-then-sample.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vllm_tslt.core.sparsify import SparsifyConfig, sparsify_then_sample
from vllm_tslt.protocol import prefix_hash

GAMMA = 4
SETTINGS = [
    ("greedy", SparsifyConfig(temperature=0.0), 1),
    ("top-k 16, b=8", SparsifyConfig(top_k=16, quant_bits=8), 1),
    ("top-p 0.95, b=12", SparsifyConfig(top_p=0.95, quant_bits=12), 1),
    ("top-p 0.95, b=12, m=4", SparsifyConfig(top_p=0.95, quant_bits=12), 4),
    ("top-k 128, b=16", SparsifyConfig(top_k=128, k_max=256, quant_bits=16), 1),
]
SettingsByName = {name: cfg for name, cfg, _ in SETTINGS}
DEFAULT_BASELINE = "e05c637"  # the last revision with the v1 (numpy bit packing) codec


def load_baseline(ref: str) -> Any:
    """The protocol package of git revision ``ref``, importable as ``tslt_baseline_protocol``."""
    root = Path(tempfile.mkdtemp(prefix="tslt-codec-"))
    archive = subprocess.run(["git", "archive", ref, "vllm_tslt/protocol"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    pkg = root / "tslt_baseline_protocol"
    (root / "vllm_tslt" / "protocol").rename(pkg)
    for f in pkg.glob("*.py"):
        f.write_text(f.read_text().replace("vllm_tslt.protocol", "tslt_baseline_protocol"))
    sys.path.insert(0, str(root))
    return importlib.import_module("tslt_baseline_protocol")


def numpy_codec(proto: Any) -> Any:
    """The current codec with drafts encoded and decoded by the numpy reference (what runs where
    numba is not installed, e.g. a device without it, and until the compiled codec is ready)."""
    from types import SimpleNamespace

    sparse_payload = importlib.import_module("vllm_tslt.protocol.sparse_payload")

    def numpy_only(call: Any) -> Any:
        def run(*args: Any) -> Any:
            sparse_payload.USE_COMPILED = False
            try:
                return call(*args)
            finally:
                sparse_payload.USE_COMPILED = True
        return run

    return SimpleNamespace(DecodeLimits=proto.DecodeLimits, Draft=proto.Draft,
                           encode=numpy_only(proto.encode), decode=numpy_only(proto.decode))


def make_drafts(cfg: SparsifyConfig, m: int, vocab: int, n: int) -> list[tuple[torch.Tensor, Any, Any]]:
    from theory import synthetic_logits  # scripts/theory.py (main puts scripts/ on sys.path)

    logits = synthetic_logits(vocab, n * GAMMA)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        u = torch.rand(GAMMA, m, dtype=torch.float64, generator=g)
        cands, q = sparsify_then_sample(logits[i * GAMMA:(i + 1) * GAMMA], cfg, u)
        out.append((cands[:, 0].clone(), q, cands[:, 1:].clone() if m > 1 else None))
    return out


def codec_calls(proto: Any, rows: list, vocab: int) -> tuple[list, list, list]:
    """(encode thunks, decode thunks, frame sizes) of one codec over the same drafts."""
    limits = proto.DecodeLimits(vocab_size=vocab, max_k=1024)
    drafts = [proto.Draft(*_head(proto), tokens, q, alts) for tokens, q, alts in rows]
    frames = [proto.encode(d) for d in drafts]
    for d, data in zip(drafts, frames):  # a benchmark of a broken codec measures nothing
        back = proto.decode(data, limits)
        assert torch.equal(back.q.counts, d.q.counts) and torch.equal(back.tokens, d.tokens)
    enc = [lambda d=d: proto.encode(d) for d in drafts]
    dec = [lambda b=b: proto.decode(b, limits) for b in frames]
    return enc, dec, [len(f) for f in frames]


def _head(proto: Any) -> tuple:
    """Draft header values: a short handle (v2) or vLLM's 48-character request id (v1)."""
    first = next(iter(proto.Draft.__dataclass_fields__))
    rid = 7 if first == "handle" else "cmpl-" + "0123456789abcdef" * 2 + "-0-" + "a1b2c3d4"
    return rid, 1000, prefix_hash([1, 2, 3])


def time_round(thunks: list, repeats: int) -> tuple[float, float]:
    """(wall µs, thread CPU µs) per call over `repeats` passes through the thunks."""
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(repeats):
        for fn in thunks:
            fn()
    n = repeats * len(thunks)
    return (time.perf_counter() - w0) / n * 1e6, (time.thread_time() - c0) / n * 1e6


def measure(codecs: dict[str, Any], vocab: int, rounds: int, repeats: int) -> list[dict]:
    out = []
    for name, cfg, m in SETTINGS:
        rows = make_drafts(cfg, m, vocab, 8)
        calls = {label: codec_calls(proto, rows, vocab) for label, proto in codecs.items()}
        times: dict[str, dict[str, list]] = {label: {"enc": [], "dec": []} for label in codecs}
        for fn_list in calls.values():  # warm-up
            time_round(fn_list[0] + fn_list[1], 3)
        for _ in range(rounds):
            for label, (enc, dec, _) in calls.items():
                times[label]["enc"].append(time_round(enc, repeats))
                times[label]["dec"].append(time_round(dec, repeats))
        for label, (_, _, sizes) in calls.items():
            t = times[label]
            out.append({
                "vocab_size": vocab, "setting": name, "codec": label,
                "bytes_per_draft": statistics.mean(sizes),
                "bytes_per_token": statistics.mean(sizes) / GAMMA,
                "mean_k": float(torch.stack([r[1].support_sizes().double() for r in rows]).mean()),
                "encode_us": statistics.median(x[0] for x in t["enc"]),
                "decode_us": statistics.median(x[0] for x in t["dec"]),
                "encode_cpu_us": statistics.median(x[1] for x in t["enc"]),
                "decode_cpu_us": statistics.median(x[1] for x in t["dec"]),
                "encode_us_range": [min(x[0] for x in t["enc"]), max(x[0] for x in t["enc"])],
                "decode_us_range": [min(x[0] for x in t["dec"]), max(x[0] for x in t["dec"])],
            })
    return out


def engine_interference(codecs: dict[str, Any], vocab: int, devices: list[int],
                        steps: int) -> list[dict]:
    """What decoding drafts in the hub's I/O thread costs the engine, which shares the GIL.

    A stand-in engine step (a loop of small torch CPU ops with Python between them, ~3 ms like
    the tiny pair's step in DESIGN.md) runs in the main thread while another thread decodes one
    top-p 0.95 draft per device for that step, as the hub's I/O thread does. Reports the median
    step time alone and with the decoding thread, and the decode time itself.
    """
    cfg = SettingsByName["top-p 0.95, b=12"]
    rows = make_drafts(cfg, 1, vocab, 8)
    a = torch.randn(48, 48)

    def engine_step() -> None:
        x = a
        for _ in range(150):
            x = torch.tanh(x @ a) * 0.5
    for _ in range(20):
        engine_step()
    out = []
    for label, proto in codecs.items():
        _, dec, _ = codec_calls(proto, rows, vocab)
        for _ in range(200):  # warm
            dec[0]()
        for n in devices:
            alone, shared, decode_s = _steps_with_decoding(engine_step, dec, n, steps)
            out.append({"codec": label, "devices": n, "vocab_size": vocab,
                        "step_ms_alone": statistics.median(alone) * 1e3,
                        "step_ms_with_decoding": statistics.median(shared) * 1e3,
                        "decode_ms_per_step": statistics.median(decode_s) * 1e3})
    return out


def _steps_with_decoding(engine_step: Any, dec: list, n: int,
                         steps: int) -> tuple[list[float], list[float], list[float]]:
    """(step s alone, step s while another thread decodes n frames, that thread's s per step)."""
    import threading

    go, finished, done = threading.Event(), threading.Event(), threading.Event()
    decode_s: list[float] = []

    def io_thread() -> None:
        while go.wait() and not done.is_set():
            go.clear()
            t0 = time.perf_counter()
            for i in range(n):
                dec[i % len(dec)]()
            decode_s.append(time.perf_counter() - t0)
            finished.set()

    th = threading.Thread(target=io_thread, daemon=True)
    th.start()
    alone, shared = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine_step()
        alone.append(time.perf_counter() - t0)
        go.set()
        t0 = time.perf_counter()
        engine_step()
        shared.append(time.perf_counter() - t0)
        finished.wait(10.0)  # the decoding thread finishes this step's frames
        finished.clear()
    done.set()
    go.set()
    th.join()
    return alone, shared, decode_s


def render(results: dict) -> str:
    lines = ["# Draft codec: bytes and speed", "",
             "Generated by `scripts/bench_codec.py`; reproduce with:", "",
             f"    {results['command']}", "",
             f"One γ = {GAMMA} draft per call (8 drafts from synthetic logits of mean entropy ~2 nats,"
             " through sparsify-then-sample), full frames (msgpack envelope included). Median of "
             f"{results['rounds']} interleaved rounds; *CPU* is the calling thread's CPU time "
             "(what a call costs on an otherwise idle core), *wall* includes waiting for the "
             f"shared cores (load average at start: {results['load_average']}). "
             "Targets (issue 16): decode ≤ 50 µs, encode ≤ 100 µs for top-p 0.95.", "",
             f"Baseline: `{results['baseline_ref']}`; its drafts carry vLLM's request-id string "
             "(48 characters), the current codec's a per-session integer handle.", "",
             "| V | setting | codec | mean k | B/token | encode µs CPU | decode µs CPU "
             "| encode µs wall | decode µs wall |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['vocab_size']} | {r['setting']} | {r['codec']} | {r['mean_k']:.1f} | "
                     f"{r['bytes_per_token']:.1f} | {r['encode_cpu_us']:.0f} | "
                     f"{r['decode_cpu_us']:.0f} | {r['encode_us']:.0f} | {r['decode_us']:.0f} |")
    if results.get("engine"):
        lines += ["", "Engine interference (`--engine-devices`): a stand-in engine step (small "
                  "torch CPU ops, Python between them) in the main thread while another thread "
                  "decodes one top-p 0.95 draft per device for that step, as the hub's I/O thread "
                  "does; both share the GIL. Medians over the steps.", "",
                  "| V | codec | devices | step ms alone | step ms while decoding | decode ms per step |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in results["engine"]:
            lines.append(f"| {r['vocab_size']} | {r['codec']} | {r['devices']} | "
                         f"{r['step_ms_alone']:.2f} | {r['step_ms_with_decoding']:.2f} | "
                         f"{r['decode_ms_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-ref", default=DEFAULT_BASELINE,
                    help="git revision whose codec runs side by side ('none': skip)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="docs/benchmarks/codec")
    ap.add_argument("--engine-devices", type=int, nargs="*", default=[],
                    help="also measure a stand-in engine step while decoding this many drafts per "
                    "step in another thread (e.g. 16 64)")
    ap.add_argument("--engine-steps", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    codecs: dict[str, Any] = {}
    if args.baseline_ref != "none":
        codecs[f"baseline ({args.baseline_ref})"] = load_baseline(args.baseline_ref)
    codecs["current"] = importlib.import_module("vllm_tslt.protocol")
    if importlib.import_module("vllm_tslt.protocol.sparse_payload").compile_codec():
        codecs["current, numpy codec"] = numpy_codec(codecs["current"])
    results = {"command": "python scripts/bench_codec.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "baseline_ref": args.baseline_ref, "rounds": args.rounds, "machine": platform.platform(),
               "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
               "rows": [r for v in args.vocab for r in measure(codecs, v, args.rounds, args.repeats)]}
    if args.engine_devices:
        results["engine"] = engine_interference(codecs, args.vocab[0], args.engine_devices,
                                                args.engine_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
