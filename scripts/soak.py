"""Load/soak run of the edge's draft hub (issue 8, part 5): N devices x M concurrent requests.

    python scripts/soak.py [--devices 4] [--requests 4] [--duration 120] [--out docs/reliability/soak.json]

What runs: the real ``DraftHub`` on loopback in this process, driven by the fake engine of the
tests (``vllm_tslt.testing.engine.BatchEngine``: bind new requests, ``collect`` drafts until the
deadline, verify each with the reference rejection sampler ``vllm_tslt.core.verify_ref``,
``commit``, ``end_request``), against a synthetic target (``TableTarget``: a bigram table,
V = 256, no vLLM, no model files). The devices run in a second process (``--device-worker``,
spawned here): N ``vllm_tslt.testing.devices.TableDevice``s, each drafting γ tokens for every
request bound to it with sparsify-then-sample from a synthetic draft (the target perturbed by
noise). Every ``--churn`` seconds one device vanishes without a goodbye and comes back with a new
session (its in-flight requests finish without drafts; its old session must expire). A quarter of
the requests are greedy and their output is checked against the target's greedy decoding.

Reported (stdout while running, JSON at --out, a markdown summary next to it): throughput
(tokens/s, steps/s), the per-step proxy overhead p50/p99 — time in ``start_request``, ``commit``,
``end_request`` and ``collect`` excluding the time ``collect`` spends blocked waiting for drafts
(measured by timing the hub's condition waits), the draft wait itself, drops by reason (the hub's
counters), requests lost (must be 0), wrong greedy outputs (must be 0), and a leak check: the
hub's tables, live hub objects, tracemalloc bytes held by the edge's code, and RSS, once the devices
have connected (before the first request) vs after the run (devices gone, sessions expired). The
check passes when the tables and hub objects are empty and the edge's traced bytes grew by less
than 64 KiB + 512 B per device session opened (the per-routing-id rate table keeps up to
max_sessions + 1024 entries by design).
Idle sessions expire after ``--idle-timeout`` seconds here (300 s in production) so that the churned
sessions are gone by the end of the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FINGERPRINT = "5" * 32
SCRIPT = Path(__file__).resolve()


@dataclass
class SoakConfig:
    devices: int = 4
    requests: int = 4  # concurrent requests per device
    duration_s: float = 120.0
    max_tokens: int = 32
    gamma: int = 4
    vocab_size: int = 256
    deadline_ms: float = 50.0
    step_ms: float = 20.0  # emulated target forward time per engine step
    greedy_fraction: float = 0.25
    churn_s: float = 15.0  # one device vanishes and reconnects this often (0: never)
    idle_timeout_s: float = 2.0
    tracemalloc: bool = True
    seed: int = 0
    progress_s: float = 10.0


# ----------------------------------------------------------------------------------------------
# The synthetic models (both processes build them from the seed) and the device worker process
# ----------------------------------------------------------------------------------------------

TARGET_SCALE = 2.5  # logit scale of the bigram target
DRAFT_NOISE = 0.7  # std of the noise on the target's log-probabilities that makes the draft


def synthetic_pair(vocab_size: int, seed: int):
    """(target, draft): a bigram TableTarget and a perturbed copy of it."""
    from vllm_tslt.testing.targets import TableTarget

    target = TableTarget(vocab_size, periods=1, scale=TARGET_SCALE, seed=seed)
    return target, target.perturbed(DRAFT_NOISE, seed + 1)


def device_worker(args: argparse.Namespace) -> None:
    """N devices in one process; prints `SESSION <index> <id>` per handshake; stops on stdin EOF."""
    import select

    from vllm_tslt.testing.devices import TableDevice

    torch.set_num_threads(1)
    _, draft = synthetic_pair(args.vocab, args.seed)
    rng = random.Random(args.seed + 1)
    opened = 0

    def connect(index: int) -> TableDevice:
        nonlocal opened
        opened += 1
        device = TableDevice(args.endpoint, draft, gamma=args.gamma, top_k=16, quant_bits=12,
                             seed=args.seed * 1000 + opened, name=f"soak-{index}",
                             fingerprint=FINGERPRINT).start()
        print(f"SESSION {index} {device.session_id}", flush=True)
        return device

    devices = [connect(i) for i in range(args.devices)]
    next_churn = time.monotonic() + args.churn if args.churn > 0 else float("inf")
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.05)
        if readable and not sys.stdin.readline():
            break  # the soak run is over (or gone)
        if time.monotonic() > next_churn:  # one device vanishes (no goodbye) and comes back
            victim = rng.randrange(len(devices))
            devices[victim].stop()
            devices[victim] = connect(victim)
            next_churn += args.churn
    for device in devices:
        device.stop(goodbye=True)


# ----------------------------------------------------------------------------------------------
# The edge side: hub + fake engine
# ----------------------------------------------------------------------------------------------


class _TimedCondition(threading.Condition):
    """The hub's condition with the time spent blocked in wait() recorded (draft waiting)."""

    waited_s = 0.0

    def wait(self, timeout: float | None = None) -> bool:
        t0 = time.perf_counter()
        try:
            return super().wait(timeout)
        finally:
            self.waited_s += time.perf_counter() - t0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _edge_traced_bytes() -> int:
    if not tracemalloc.is_tracing():
        return 0
    snap = tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(True, "*/vllm_tslt/edge/*"),
        tracemalloc.Filter(True, "*/vllm_tslt/protocol/*")])
    return sum(s.size for s in snap.statistics("filename"))


def _hub_objects() -> dict[str, int]:
    from vllm_tslt.edge.sessions import BoundRequest, Session
    from vllm_tslt.protocol import Draft

    kinds = {"Session": Session, "BoundRequest": BoundRequest, "Draft": Draft}
    counts = dict.fromkeys(kinds, 0)
    for obj in gc.get_objects():
        for name, cls in kinds.items():
            if type(obj) is cls:
                counts[name] += 1
    return counts


def _leak_state(hub) -> dict[str, Any]:
    gc.collect()
    snap = hub.snapshot()
    return {"sessions": snap["sessions_active"], "requests": snap["requests_active"],
            "routing_ids": len(hub.table.by_identity), "rate_guards": len(hub.io.guards),
            "objects": _hub_objects(), "edge_traced_bytes": _edge_traced_bytes(),
            "rss_bytes": _rss_bytes()}


class SoakRun:
    def __init__(self, cfg: SoakConfig) -> None:
        from vllm_tslt.edge import sessions as sessions_module
        from vllm_tslt.edge.config import TsltConfig
        from vllm_tslt.edge.hub import DraftHub
        from vllm_tslt.testing.engine import BatchEngine

        self.cfg = cfg
        self.target, _ = synthetic_pair(cfg.vocab_size, cfg.seed)
        sessions_module.SESSION_IDLE_TIMEOUT_S = cfg.idle_timeout_s
        self.hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=cfg.deadline_ms),
                            vocab_size=cfg.vocab_size, vocab_fingerprint=FINGERPRINT,
                            model_name="synthetic", max_gamma=cfg.gamma)
        self.cond = _TimedCondition(threading.Lock())
        self.hub.table.cond = self.cond  # before start(): every wait of collect() is timed
        self.engine = BatchEngine(self.hub, self.target, deadline_s=cfg.deadline_ms / 1000,
                                  seed=cfg.seed + 4, step_s=cfg.step_ms / 1000)
        self.rng = random.Random(cfg.seed + 3)
        self.running: dict[str, tuple[Any, int]] = {}  # request id -> (Job, index of its device)
        self.sessions: dict[int, str] = {}
        self.session_lines = 0
        self.overhead_us: list[float] = []
        self.wait_us: list[float] = []
        self.step_us: list[float] = []
        self.counts: Counter[str] = Counter()
        self.worker: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------ devices

    def _start_devices(self) -> None:
        cmd = [sys.executable, str(SCRIPT), "--device-worker", "--endpoint", self.hub.endpoint,
               "--devices", str(self.cfg.devices), "--vocab", str(self.cfg.vocab_size),
               "--gamma", str(self.cfg.gamma), "--seed", str(self.cfg.seed),
               "--churn", str(self.cfg.churn_s)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.worker = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env)
        self._reader = threading.Thread(target=self._read_sessions, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        while len(self.sessions) < self.cfg.devices:
            if time.monotonic() > deadline or self.worker.poll() is not None:
                raise RuntimeError(f"device worker did not connect (exit {self.worker.poll()})")
            time.sleep(0.05)

    def _read_sessions(self) -> None:
        assert self.worker is not None and self.worker.stdout is not None
        for line in self.worker.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "SESSION":
                self.sessions[int(parts[1])] = parts[2]
                self.session_lines += 1

    def _stop_devices(self) -> None:
        if self.worker is None:
            return
        assert self.worker.stdin is not None
        self.worker.stdin.close()  # EOF: goodbye from every device, then exit
        try:
            self.worker.wait(30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait(10)
        if self._reader is not None:
            self._reader.join(10)

    # ------------------------------------------------------------------ engine

    def _new_request(self, device: int) -> None:
        from vllm_tslt.testing.engine import Job

        greedy = self.rng.random() < self.cfg.greedy_fraction
        prompt = [self.rng.randrange(self.cfg.vocab_size) for _ in range(4)]
        job = Job(f"soak-{self.counts['started']}", self.sessions[device], prompt,
                  self.cfg.max_tokens, 0.0 if greedy else 1.0)
        self.running[job.request_id] = (job, device)
        bound = self.engine.admit(job)
        self.counts["started"] += 1
        self.counts["started_unbound"] += int(not bound)

    def _finish(self, request_id: str, out: list[int]) -> None:
        job, _ = self.running.pop(request_id)
        ok = len(out) == self.cfg.max_tokens and all(0 <= t < self.cfg.vocab_size for t in out)
        if ok and job.temperature == 0 and out != self.target.greedy(job.prompt, len(out)):
            self.counts["wrong_greedy_outputs"] += 1
        self.counts["completed" if ok else "invalid_outputs"] += 1
        self.counts["greedy_checked"] += int(job.temperature == 0)

    def _step(self) -> None:
        """One engine step, timed: the proxy's overhead is the time in hub calls (admissions
        included) minus the time collect() spent blocked waiting for drafts."""
        waited0 = self.cond.waited_s
        t0 = time.perf_counter()
        record = self.engine.step()
        self.step_us.append((time.perf_counter() - t0) * 1e6)
        waited = self.cond.waited_s - waited0
        self.counts["tokens"] += record.tokens
        self.counts["request_steps"] += record.requests
        self.counts["drafted_steps"] += record.drafted
        self.counts["steps"] += 1
        for rid, out in record.finished.items():
            self._finish(rid, out)
        self.overhead_us.append((record.hub_s - waited) * 1e6)
        self.wait_us.append(waited * 1e6)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        torch.set_num_threads(1)
        if cfg.tracemalloc:
            tracemalloc.start(1)
        self.hub.start()
        try:
            self._start_devices()
            return self._run_loop()
        finally:
            self._stop_devices()
            self.hub.close()
            if tracemalloc.is_tracing():
                tracemalloc.stop()

    def _run_loop(self) -> dict[str, Any]:
        cfg = self.cfg
        baseline = _leak_state(self.hub)  # devices connected, no request yet
        t_start = time.monotonic()
        next_progress = t_start + cfg.progress_s
        end = t_start + cfg.duration_s
        while True:
            now = time.monotonic()
            if now < end:  # keep M requests per device in flight
                per_device = Counter(device for _, device in self.running.values())
                for d in range(cfg.devices):
                    for _ in range(cfg.requests - per_device[d]):
                        self._new_request(d)
            elif not self.engine.active:
                break
            self._step()
            if now >= next_progress:
                self._progress(now - t_start)
                next_progress += cfg.progress_s
        elapsed = time.monotonic() - t_start
        self._stop_devices()  # goodbyes; the churned sessions expire by idle timeout
        deadline = time.monotonic() + cfg.idle_timeout_s + 10
        while self.hub.snapshot()["sessions_active"] and time.monotonic() < deadline:
            time.sleep(0.2)
        final = _leak_state(self.hub)
        return self._report(elapsed, baseline, final)

    def _progress(self, elapsed: float) -> None:
        c = self.counts
        print(f"[{elapsed:6.1f} s] requests {c['completed']}/{c['started']} done, "
              f"{c['tokens'] / elapsed:7.0f} tok/s, {c['steps'] / elapsed:5.1f} steps/s, "
              f"drafted {c['drafted_steps'] / max(c['request_steps'], 1):.0%} of request-steps, "
              f"overhead p99 {_percentile(self.overhead_us, 0.99):.0f} us", flush=True)

    def _report(self, elapsed: float, baseline: dict, final: dict) -> dict[str, Any]:
        c, snap, stats = self.counts, self.hub.snapshot(), self.engine.stats
        accepted = sum(stats.accepted.values())
        drops = {k: v for k, v in sorted(snap.items()) if k.startswith(
            ("dropped_", "invalid_", "handshake_refused_", "requests_", "downlink_dropped"))
            and k not in ("requests_active", "requests_bound")}
        lost = c["started"] - c["completed"]
        growth = final["edge_traced_bytes"] - baseline["edge_traced_bytes"]
        new_ids = self.session_lines
        leak_ok = (final["sessions"] == 0 and final["requests"] == 0 and final["routing_ids"] == 0
                   and final["objects"]["BoundRequest"] == 0 and final["objects"]["Session"] == 0
                   and growth < 64 * 1024 + 512 * new_ids)
        return {
            "config": asdict(self.cfg),
            "command": command_line(self.cfg),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "torch": torch.__version__},
            "elapsed_s": round(elapsed, 1),
            "requests": {"started": c["started"], "completed": c["completed"], "lost": lost,
                         "invalid_outputs": c["invalid_outputs"],
                         "greedy_checked": c["greedy_checked"],
                         "wrong_greedy_outputs": c["wrong_greedy_outputs"],
                         "started_without_session": c["started_unbound"]},
            "throughput": {"tokens_per_s": round(c["tokens"] / elapsed, 1),
                           "steps_per_s": round(c["steps"] / elapsed, 1),
                           "requests_per_s": round(c["completed"] / elapsed, 2),
                           "request_steps_with_draft": round(
                               c["drafted_steps"] / max(c["request_steps"], 1), 3),
                           "acceptance": round(accepted / max(stats.draft_tokens, 1), 3)},
            "proxy_overhead_us": _summary(self.overhead_us),
            "draft_wait_us": _summary(self.wait_us),
            "step_us": _summary(self.step_us),
            "hub_counters": {k: snap.get(k, 0) for k in (
                "sessions_opened", "sessions_closed", "requests_bound", "drafts_received",
                "drafts_used", "uplink_bytes", "downlink_bytes", "internal_errors")},
            "drops": drops,
            "device_sessions_opened": new_ids,
            "leak": {"baseline": baseline, "final": final, "edge_traced_growth_bytes": growth,
                     "ok": leak_ok},
        }


def command_line(cfg: SoakConfig) -> str:
    """The command that reproduces a run with this configuration."""
    return (f"python scripts/soak.py --devices {cfg.devices} --requests {cfg.requests} "
            f"--duration {cfg.duration_s:g} --max-tokens {cfg.max_tokens} --gamma {cfg.gamma} "
            f"--vocab {cfg.vocab_size} --deadline-ms {cfg.deadline_ms:g} --step-ms {cfg.step_ms:g} "
            f"--churn {cfg.churn_s:g} --idle-timeout {cfg.idle_timeout_s:g} --seed {cfg.seed}"
            + ("" if cfg.tracemalloc else " --no-tracemalloc"))


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(_percentile(values, 0.5), 1),
            "p99": round(_percentile(values, 0.99), 1), "max": round(max(values, default=0), 1),
            "mean": round(statistics.fmean(values), 1) if values else 0.0}


def markdown(result: dict[str, Any]) -> str:
    r, t, o, w = (result["requests"], result["throughput"], result["proxy_overhead_us"],
                  result["draft_wait_us"])
    cfg, leak = result["config"], result["leak"]
    drops = ", ".join(f"{k} {v}" for k, v in result["drops"].items()) or "none"
    b, f = leak["baseline"], leak["final"]
    return "\n".join([
        f"# Soak run ({cfg['devices']} devices x {cfg['requests']} concurrent requests, "
        f"{result['elapsed_s']} s, {result['machine']['cpus']} CPUs)",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| requests started / completed / **lost** | {r['started']} / {r['completed']} / "
        f"**{r['lost']}** |",
        f"| greedy outputs checked / wrong | {r['greedy_checked']} / {r['wrong_greedy_outputs']} |",
        f"| throughput | {t['tokens_per_s']} tokens/s, {t['steps_per_s']} steps/s, "
        f"{t['requests_per_s']} requests/s |",
        f"| request-steps verified with a draft, acceptance | "
        f"{t['request_steps_with_draft']:.1%}, {t['acceptance']:.2f} |",
        f"| proxy overhead per step (p50 / p99 / max) | {o['p50']} / {o['p99']} / {o['max']} us |",
        f"| draft wait per step (p50 / p99) | {w['p50']} / {w['p99']} us |",
        f"| device sessions opened (incl. churn) | {result['device_sessions_opened']} |",
        f"| drops by reason | {drops} |",
        f"| hub tables start -> end (sessions, requests, routing ids) | "
        f"{b['sessions']}, {b['requests']}, {b['routing_ids']} -> "
        f"{f['sessions']}, {f['requests']}, {f['routing_ids']} |",
        f"| live hub objects start -> end | {b['objects']} -> {f['objects']} |",
        (f"| edge-code tracemalloc bytes start -> end | {b['edge_traced_bytes']} -> "
         f"{f['edge_traced_bytes']} ({leak['edge_traced_growth_bytes']:+d}) |" if cfg["tracemalloc"]
         else "| edge-code tracemalloc bytes | not traced (--no-tracemalloc) |"),
        f"| process RSS start -> end | {b['rss_bytes'] / 2**20:.1f} -> "
        f"{f['rss_bytes'] / 2**20:.1f} MiB |",
        f"| leak check | {'ok' if leak['ok'] else 'FAILED'} |",
        "",
        f"Reproduce: `{result['command']}`",
        ""])


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    return SoakRun(cfg).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=SoakConfig.devices)
    ap.add_argument("--requests", type=int, default=SoakConfig.requests,
                    help="concurrent requests per device")
    ap.add_argument("--duration", type=float, default=SoakConfig.duration_s, help="seconds")
    ap.add_argument("--max-tokens", type=int, default=SoakConfig.max_tokens)
    ap.add_argument("--gamma", type=int, default=SoakConfig.gamma)
    ap.add_argument("--vocab", type=int, default=SoakConfig.vocab_size)
    ap.add_argument("--deadline-ms", type=float, default=SoakConfig.deadline_ms)
    ap.add_argument("--step-ms", type=float, default=SoakConfig.step_ms)
    ap.add_argument("--churn", type=float, default=SoakConfig.churn_s,
                    help="seconds between device churns (0: none)")
    ap.add_argument("--idle-timeout", type=float, default=SoakConfig.idle_timeout_s)
    ap.add_argument("--no-tracemalloc", action="store_true",
                    help="leave tracemalloc off (lower overhead numbers, no traced-bytes check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/reliability/soak.json"))
    ap.add_argument("--device-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device_worker:
        device_worker(args)
        return 0
    cfg = SoakConfig(devices=args.devices, requests=args.requests, duration_s=args.duration,
                     max_tokens=args.max_tokens, gamma=args.gamma, vocab_size=args.vocab,
                     deadline_ms=args.deadline_ms, step_ms=args.step_ms, churn_s=args.churn,
                     idle_timeout_s=args.idle_timeout, tracemalloc=not args.no_tracemalloc,
                     seed=args.seed)
    print(f"soak: {cfg.devices} devices x {cfg.requests} requests for {cfg.duration_s:g} s: "
          f"{command_line(cfg)}", flush=True)
    result = run_soak(cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    ok = result["requests"]["lost"] == 0 and result["requests"]["wrong_greedy_outputs"] == 0 \
        and result["leak"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(SCRIPT.parent.parent))
    raise SystemExit(main())
