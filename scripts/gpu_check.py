#!/usr/bin/env python3
"""GPU check for kernels/: run the kernel tests natively, then microbenchmark.

For a machine with an NVIDIA GPU, torch and Triton, but no vLLM and no network. Needs no install:
the repository root goes on sys.path. Finishes in under 5 minutes (a deadline skips what is
left and says so).

    scripts/gpu_check.sh                    # tests + benchmarks, JSON to $OUT or ./out
    scripts/gpu_check.sh --peak-gbps 4800   # override the device's peak memory bandwidth
    scripts/gpu_check.sh --skip-tests --quick

Benchmarks, for N in {64, 512, 4096} draft rows and V in {32000, 151936}:
  * scatter kernel (sparse q̃ -> dense fp32 [N, V]),
  * scatter + vLLM's dense rejection sampler (Triton transcription, kernels/dense_rejection.py),
  * the fused sparse sampler (kernels/sparse_rejection.py), m = 1 (and m = 3 for reference),
in two regimes: "worst" (gamma = 1, unrelated draft: every row is rejected, so the fused kernel
streams every target row once) and "typical" (gamma = 4, draft a perturbed target).
Achieved GB/s counts the bytes each kernel must move (model in docs/kernels.md) over the median
time from triton.testing.do_bench (L2 flushed between runs), against the device's peak.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "kernels"))

import torch  # noqa: E402

DEADLINE_S = 280.0
# Peak memory bandwidth in GB/s by device-name substring (first match wins; most specific first).
PEAK_GBPS = [
    ("gh200", 4000.0), ("h200", 4800.0), ("h100 pcie", 2000.0), ("h100 nvl", 3900.0),
    ("h100", 3350.0), ("h800", 3350.0), ("b200", 8000.0), ("a100-sxm4-80gb", 2039.0),
    ("a100 80gb pcie", 1935.0), ("a100", 1555.0), ("a800", 2039.0), ("l40s", 864.0),
    ("l40", 864.0), ("a10g", 600.0), ("a10", 600.0), ("l4", 300.0), ("rtx 4090", 1008.0),
    ("rtx 3090", 936.0), ("v100", 900.0), ("t4", 320.0),
]
SHAPES_N = [64, 512, 4096]
SHAPES_V = [32000, 151936]
TOP_K = 32
# Same synthetic distributions as scripts/bench_verify_cpu.py: target logits ~ N(0, 8^2) (the
# top-32 hold most of the mass), typical draft = target logits + N(0, 1).
SHARPNESS = 8.0
DRAFT_NOISE = 1.0


def peak_gbps(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-gbps"
    lowered = name.lower()
    for key, gbps in PEAK_GBPS:
        if key in lowered:
            return gbps, f"table entry '{key}'"
    return None, "unknown device: pass --peak-gbps"


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def run_tests(timeout_s: float) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return builtin_tests()
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "-rs"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired as exc:
        return {"runner": "pytest", "ok": False, "error": f"timed out after {timeout_s:.0f}s",
                "tail": (exc.stdout or "")[-4000:] if isinstance(exc.stdout, str) else ""}
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    return {"runner": "pytest", "ok": proc.returncode == 0, "returncode": proc.returncode,
            "seconds": round(time.time() - started, 1), "summary": tail.strip().splitlines()[-1:],
            "tail": tail}


def builtin_tests(device: str = "cuda") -> dict:
    """The same comparisons as tests/kernels, without pytest."""
    from kernel_cases import DRAFT_LAYOUTS, dense_args, import_kernels, make_case, sampler_args

    kern = import_kernels()
    results, failures = [], []

    def check(name, fn):
        try:
            fn()
            results.append(name)
        except Exception:  # report every failure, keep going
            failures.append({"name": name, "error": traceback.format_exc()[-2000:]})

    for layout_id, layout in enumerate(DRAFT_LAYOUTS):
        for m, k in ((1, 5), (2, 7), (3, 13)):
            for seed in range(3):
                case = make_case(100 * layout_id + seed, layout, 203, k, m, device=device)

                def fused(case=case):
                    args, kwargs = sampler_args(case)
                    ref = kern.sparse_rejection_sample_ref(*args, **kwargs)
                    assert torch.equal(kern.sparse_rejection_sample_torch(*args, **kwargs), ref)
                    assert torch.equal(kern.sparse_rejection_sample(*args, block_size=64,
                                                                    **kwargs), ref)
                check(f"fused[{layout_id}-{m}-{k}-{seed}]", fused)
        case = make_case(500 + layout_id, layout, 211, 5, 1, device=device)

        def dense(case=case):
            q = kern.scatter_sparse_q_counts(case["sparse_indices"], case["sparse_counts"],
                                             case["quant_bits"], 211, block_size=64)
            assert torch.equal(q, kern.scatter_sparse_q_ref(case["sparse_indices"],
                                                            case["sparse_probs"], 211))
            expected = kern.dense_rejection_sample_ref(*dense_args(case, q))
            args, kwargs = sampler_args(case)
            assert torch.equal(kern.sparse_rejection_sample(*args, **kwargs), expected)
            assert torch.equal(kern.dense_rejection_sample_triton(*dense_args(case, q)), expected)
        check(f"dense_equivalence[{layout_id}]", dense)
    return {"runner": "builtin", "ok": not failures, "passed": len(results),
            "failed": len(failures), "failures": failures}


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def make_inputs(num_tokens: int, vocab: int, gamma: int, correlated: bool, num_candidates: int,
                seed: int = 0, dev: str = "cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(seed)
    batch = num_tokens // gamma
    logits = torch.randn(num_tokens, vocab, device=dev, generator=g) * SHARPNESS
    target_probs = logits.softmax(dim=-1)
    if correlated:
        draft_logits = logits + DRAFT_NOISE * torch.randn(num_tokens, vocab, device=dev,
                                                           generator=g)
    else:
        draft_logits = torch.randn(num_tokens, vocab, device=dev, generator=g) * SHARPNESS
    del logits
    top_vals, top_idx = draft_logits.topk(TOP_K, dim=-1)
    del draft_logits
    order = top_idx.argsort(dim=-1)
    indices = top_idx.gather(1, order).to(torch.int32).contiguous()
    probs = top_vals.gather(1, order).softmax(dim=-1).contiguous()
    cands = torch.multinomial(probs, num_candidates, replacement=True, generator=g)
    cands = indices.gather(1, cands).contiguous()
    return dict(
        draft_token_ids=cands[:, 0].contiguous(),
        alt_token_ids=cands[:, 1:].contiguous() if num_candidates > 1 else None,
        cu_num_draft_tokens=torch.arange(1, batch + 1, device=dev, dtype=torch.int32) * gamma,
        max_spec_len=gamma,
        target_probs=target_probs,
        sparse_indices=indices,
        sparse_probs=probs,
        bonus_token_ids=torch.zeros(batch, 1, device=dev, dtype=torch.int32) + vocab,
        uniform_probs=torch.rand(num_tokens, num_candidates, device=dev, dtype=torch.float64,
                                 generator=g).squeeze(1),
        is_greedy=torch.zeros(batch, device=dev, dtype=torch.bool),
        inv_q=torch.empty(batch, vocab, device=dev).exponential_(generator=g).reciprocal(),
        # all requests random: like vLLM's all_random fast path, no argmax pass is needed
        target_argmax=torch.zeros(num_tokens, device=dev, dtype=torch.int64),
    )


def time_ms(fn, budget_ms: float) -> float:
    import triton.testing

    fn()  # compile / warm
    if not torch.cuda.is_available():  # --cpu-smoke: exercise the code, not the numbers
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=max(5, budget_ms / 10), rep=budget_ms,
                                         return_mode="median"))


def bench_shape(kern, n: int, vocab: int, regime: str, budget_ms: float,
                dev: str = "cuda") -> dict:
    gamma, correlated = (1, False) if regime == "worst" else (4, True)
    x = make_inputs(n, vocab, gamma, correlated, 1, dev=dev)
    batch = n // gamma
    iq_bytes = x["inv_q"].element_size()

    def scatter():
        return kern.scatter_sparse_q(x["sparse_indices"], x["sparse_probs"], vocab)

    dense_q = scatter()
    dense_args = (x["draft_token_ids"], x["cu_num_draft_tokens"], gamma, x["target_probs"],
                  dense_q, x["bonus_token_ids"], x["uniform_probs"], x["is_greedy"], x["inv_q"],
                  x["target_argmax"])

    def scatter_dense():
        q = scatter()
        return kern.dense_rejection_sample_triton(*dense_args[:4], q, *dense_args[5:])

    def fused():
        return kern.sparse_rejection_sample(
            x["draft_token_ids"], x["cu_num_draft_tokens"], gamma, x["target_probs"],
            x["sparse_indices"], x["sparse_probs"], x["bonus_token_ids"], x["uniform_probs"],
            x["is_greedy"], inv_q=x["inv_q"], target_argmax=x["target_argmax"])

    out_fused = fused()
    out_dense = kern.dense_rejection_sample_triton(*dense_args)
    # m = 1 requests that did not end with the bonus token stopped at a recovered token: those
    # (and only those) rows are streamed by the fused kernel
    recovered_rows = int((out_fused[torch.arange(batch, device=dev), gamma] != vocab).sum())
    emitted = int((out_fused >= 0).sum())
    t_scatter = time_ms(scatter, budget_ms)
    t_dense_only = time_ms(lambda: kern.dense_rejection_sample_triton(*dense_args), budget_ms)
    t_scatter_dense = time_ms(scatter_dense, budget_ms)
    t_fused = time_ms(fused, budget_ms)
    bytes_scatter = n * vocab * 4 + n * TOP_K * 8
    # vLLM's recovered kernel reads draft q, target p and inv_q for every draft row
    bytes_dense = n * vocab * (4 + 4 + iq_bytes) + n * 64
    bytes_fused = recovered_rows * vocab * (4 + iq_bytes) + n * (TOP_K * 12 + 24)
    m3 = make_inputs(n, vocab, gamma, correlated, 3, seed=1, dev=dev)
    t_fused_m3 = time_ms(lambda: kern.sparse_rejection_sample(
        m3["draft_token_ids"], m3["cu_num_draft_tokens"], gamma, m3["target_probs"],
        m3["sparse_indices"], m3["sparse_probs"], m3["bonus_token_ids"], m3["uniform_probs"],
        m3["is_greedy"], inv_q=m3["inv_q"], alt_token_ids=m3["alt_token_ids"],
        target_argmax=m3["target_argmax"]), budget_ms)
    if dev == "cuda":
        torch.cuda.empty_cache()
    return dict(
        regime=regime, num_draft_rows=n, vocab_size=vocab, gamma=gamma, batch_size=batch,
        top_k=TOP_K, fused_matches_dense=bool(torch.equal(out_fused, out_dense)),
        acceptance=round((emitted - batch) / n, 4) if n else None,
        fused_streamed_rows=recovered_rows,
        ms=dict(scatter=t_scatter, dense_sampler=t_dense_only, scatter_plus_dense=t_scatter_dense,
                fused_m1=t_fused, fused_m3=t_fused_m3),
        bytes=dict(scatter=bytes_scatter, dense_sampler=bytes_dense, fused_m1=bytes_fused),
        gbps=dict(scatter=bytes_scatter / t_scatter / 1e6,
                  dense_sampler=bytes_dense / t_dense_only / 1e6,
                  fused_m1=bytes_fused / t_fused / 1e6),
        speedup_fused_vs_scatter_dense=t_scatter_dense / t_fused,
    )


def sweep_fused_launch(kern, budget_ms: float, dev: str = "cuda", n: int = 4096,
                       vocab: int = 151936) -> list[dict]:
    """Fused kernel launch tunables at the target shape (worst regime): which to default to."""
    x = make_inputs(n, vocab, 1, False, 1, dev=dev)
    reference = None
    rows = []
    for block_size, num_warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16),
                                  (16384, 16)):
        def fused(block_size=block_size, num_warps=num_warps):
            return kern.sparse_rejection_sample(
                x["draft_token_ids"], x["cu_num_draft_tokens"], 1, x["target_probs"],
                x["sparse_indices"], x["sparse_probs"], x["bonus_token_ids"],
                x["uniform_probs"], x["is_greedy"], inv_q=x["inv_q"],
                target_argmax=x["target_argmax"], block_size=block_size, num_warps=num_warps)
        try:
            out = fused()
            reference = out if reference is None else reference
            recovered = int((out[:, 1] != vocab).sum())
            ms = time_ms(fused, budget_ms)
            rows.append(dict(block_size=block_size, num_warps=num_warps, ms=ms,
                             same_output=bool(torch.equal(out, reference)),
                             gbps=(recovered * vocab * 8 + n * (TOP_K * 12 + 24)) / ms / 1e6))
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            rows.append(dict(block_size=block_size, num_warps=num_warps,
                             error=f"{type(exc).__name__}: {exc}"[:300]))
    return rows


def copy_bandwidth_gbps() -> float:
    src = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 100)
    return 2 * src.numel() * 4 / ms / 1e6


def print_table(rows: list[dict], peak: float | None) -> None:
    head = (f"{'regime':8} {'N':>5} {'V':>7} {'acc':>5} {'scatter ms':>10} {'GB/s':>6} "
            f"{'dense ms':>9} {'GB/s':>6} {'scat+dense':>10} {'fused ms':>9} {'GB/s':>6} "
            f"{'%peak':>6} {'x':>6} {'m3 ms':>7} {'same':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms, gb = r["ms"], r["gbps"]
        pct = f"{100 * gb['fused_m1'] / peak:6.1f}" if peak else "   n/a"
        print(f"{r['regime']:8} {r['num_draft_rows']:>5} {r['vocab_size']:>7} "
              f"{r['acceptance']:>5.2f} {ms['scatter']:>10.3f} {gb['scatter']:>6.0f} "
              f"{ms['dense_sampler']:>9.3f} {gb['dense_sampler']:>6.0f} "
              f"{ms['scatter_plus_dense']:>10.3f} {ms['fused_m1']:>9.3f} {gb['fused_m1']:>6.0f} "
              f"{pct} {r['speedup_fused_vs_scatter_dense']:>6.1f} {ms['fused_m3']:>7.3f} "
              f"{r['fused_matches_dense']!s:>5}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="device peak memory bandwidth in GB/s (default: table by name)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--quick", action="store_true", help="shorter timing budgets")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "out"))
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="dry run of this script's code on the CPU (TRITON_INTERPRET=1, tiny "
                             "shapes, meaningless timings)")
    opts = parser.parse_args()
    started = time.time()
    os.makedirs(opts.out, exist_ok=True)
    out_path = os.path.join(opts.out, "gpu_check.json")
    dev = "cpu" if opts.cpu_smoke else "cuda"
    shapes_n, shapes_v = ([8, 12], [300]) if opts.cpu_smoke else (SHAPES_N, SHAPES_V)
    if not opts.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU machine (or --cpu-smoke)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke run)"
    peak, peak_source = peak_gbps(name, opts.peak_gbps)
    import triton

    report = dict(command=" ".join([sys.argv[0], *sys.argv[1:]]), device=name,
                  peak_gbps=peak, peak_source=peak_source, torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(), tests=None,
                  bench=[], skipped=[], notes=[])

    def save():
        report["seconds"] = round(time.time() - started, 1)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)

    if not opts.skip_tests:
        report["tests"] = builtin_tests("cpu") if opts.cpu_smoke else run_tests(timeout_s=150.0)
        save()
    if not opts.skip_bench:
        from kernel_cases import import_kernels

        kern = import_kernels()
        report["copy_gbps"] = copy_bandwidth_gbps() if dev == "cuda" else 0.0
        budget = 25.0 if opts.quick else 60.0
        for regime in ("worst", "typical"):
            for vocab in shapes_v:
                for n in shapes_n:
                    if time.time() - started > DEADLINE_S:
                        report["skipped"].append(f"{regime} N={n} V={vocab}: deadline")
                        continue
                    try:
                        report["bench"].append(bench_shape(kern, n, vocab, regime, budget, dev))
                    except Exception:
                        report["skipped"].append(f"{regime} N={n} V={vocab}: "
                                                 + traceback.format_exc()[-1500:])
                    save()
        if time.time() - started < DEADLINE_S:
            n_sweep, v_sweep = (12, 300) if opts.cpu_smoke else (4096, 151936)
            report["fused_launch_sweep"] = sweep_fused_launch(kern, budget, dev, n_sweep, v_sweep)
            for row in report["fused_launch_sweep"]:
                print("fused launch", row)
        else:
            report["skipped"].append("fused launch sweep: deadline")
        save()
        print(f"\n{name}: peak {peak} GB/s ({peak_source}); torch copy "
              f"{report['copy_gbps']:.0f} GB/s")
        print_table(report["bench"], peak)
        target = [r for r in report["bench"] if r["regime"] == "worst"
                  and r["num_draft_rows"] == 4096 and r["vocab_size"] == 151936]
        if target and peak:
            r = target[0]
            report["targets"] = dict(
                fused_pct_of_peak=100 * r["gbps"]["fused_m1"] / peak,
                fused_pct_ok=100 * r["gbps"]["fused_m1"] / peak >= 70,
                speedup=r["speedup_fused_vs_scatter_dense"],
                speedup_ok=r["speedup_fused_vs_scatter_dense"] >= 2)
            print("targets (worst regime, N=4096, V=151936):", report["targets"])
    for line in report["skipped"]:
        print("skipped:", line.splitlines()[0])
    save()
    print(f"wrote {out_path} in {time.time() - started:.0f}s")
    tests_ok = report["tests"] is None or report["tests"]["ok"]
    same = all(r["fused_matches_dense"] for r in report["bench"])
    return 0 if tests_ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
