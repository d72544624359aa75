"""The side-by-side benchmark: every system on one pair, under emulated links, in one run.

Servers (all pinned to the edge CPUs): target-only vLLM; vLLM with its co-located ``draft_model``
(the upper bound without a network); the TSLT edge (``method: tslt``, fused verifier, every wire
format accepted). Devices (pinned to the device CPUs, in this process): one ``DraftRuntime`` per
device with its own ``EmulatedLink``; DSD and TK-SLT are the same agent sending the baselines' wire
formats, so everything but the uplink format is shared.

A request goes device -> edge's OpenAI API (streaming, ``ignore_eos``: fixed length). Its HTTP leg
crosses the same emulated link: the request leaves RTT/2 late and every streamed chunk is stamped
RTT/2 after it arrived (nothing feeds back from the client's clock into generation, so shifting
timestamps is exact). The draft channel is shaped frame by frame (vllm_tslt.agent.link).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_tslt.agent.link import EmulatedLink, LinkSpec

logger = logging.getLogger(__name__)

PROMPTS = ["def read_config(path):\n", "import os\n\n\nclass ", "    for key, value in ",
           "def parse_args(argv=None):\n    ", "class Cache:\n    def __init__(self", "    try:\n"]
EDGE_GAMMA_MAX = 8
DEADLINE_MS = 1500.0  # the edge waits this long per step for a draft (DSD at 1 Mbit/s needs it)


@dataclass(frozen=True)
class System:
    name: str
    wire: str | None = None  # None: no device drafts (target-only / colocated)
    top_k: int | None = None
    top_p: float | None = None
    candidates: int = 1
    server: str = "edge"  # which vLLM server: "target", "colocated" or "edge"


TARGET_ONLY = System("target-only", server="target")
COLOCATED = System("colocated draft_model", server="colocated")
# The TSLT edge serving requests that name no device: what vLLM costs with the speculative config
# alone (custom_class proposer, no async scheduling) -- the floor for adaptive γ with speculation off.
EDGE_ALONE = System("tslt edge, no drafts", server="edge")
DSD32 = System("DSD fp32", "dsd-fp32")
DSD16 = System("DSD fp16", "dsd-fp16")
TKSLT = System("TK-SLT", "tkslt", top_k=16)
TSLT_K = System("TSLT top-K", "tslt", top_k=16)
TSLT_P = System("TSLT top-p", "tslt", top_p=0.95)
TSLT_MC = System("TSLT multi-candidate", "tslt", top_p=0.95, candidates=2)
REMOTE = (DSD32, DSD16, TKSLT, TSLT_K, TSLT_P, TSLT_MC)


@dataclass
class Plan:
    quick: bool
    uplinks: tuple[float, ...]
    rtts: tuple[float, ...]
    gammas: tuple[str, ...]
    requests: int
    max_tokens: int
    sweep_k: tuple[int, ...]
    sweep_p: tuple[float, ...]
    sweep_m: tuple[int, ...]
    devices: tuple[int, ...]
    sweep_requests: int = 2  # the sweep compares acceptance: more tokens per cell
    sweep_max_tokens: int = 32
    device_requests: int = 2  # per device in the devices experiment
    downlink_mbps: float = 100.0
    temperature: float = 1.0
    fast_link: LinkSpec = field(default_factory=lambda: LinkSpec(100.0, 100.0, 5.0))

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(True, (1.0, 10.0, 100.0), (20.0,), ("4", "auto"), 2, 32,
                        (8, 32), (0.9,), (2,), (1, 4))
        return Plan(False, (1.0, 5.0, 10.0, 25.0, 100.0), (5.0, 20.0, 50.0), ("4", "auto"), 3, 48,
                    (4, 8, 16, 32, 64), (0.8, 0.9, 0.95, 0.99), (2, 4), (1, 4, 16),
                    sweep_requests=6, sweep_max_tokens=64, device_requests=2)


class Bench:
    """Holds the servers' URLs, the shared draft model and the results."""

    def __init__(self, pair: Any, plan: Plan, urls: dict[str, str], hub: str) -> None:
        self.pair, self.plan, self.urls, self.hub = pair, plan, urls, hub
        self.records: list[dict[str, Any]] = []
        self.target_only: dict[tuple[float, int], list[float]] = {}  # (rtt, N) -> tokens/s runs
        self.model = str(pair.target)

    # ------------------------------------------------------------------ one cell

    def run_cell(self, experiment: str, system: System, link: LinkSpec | None, gamma: str,
                 num_devices: int, requests: int | None = None) -> dict[str, Any]:
        from vllm_tslt.edge.launch import scrape_metrics

        plan = self.plan
        max_tokens = plan.sweep_max_tokens if experiment == "sweep" else plan.max_tokens
        requests = requests or {"sweep": plan.sweep_requests,
                                "devices": plan.device_requests}.get(experiment, plan.requests)
        url = self.urls[system.server]
        rtt_s = (link.rtt_ms if link else 0.0) / 1e3
        runtimes = [self._runtime(system, link, gamma) for _ in range(num_devices)] \
            if system.wire else []
        try:
            if gamma == "auto":  # a device in steady state: its estimates are learnt already
                for i, rt in enumerate(runtimes):
                    _one_request(url, self.model, PROMPTS[i % len(PROMPTS)], max_tokens,
                                 plan.temperature, rt.session_id, rtt_s)
                warm = [rt.stats() for rt in runtimes]
            before = _spec_counters(scrape_metrics(url))
            t0 = time.perf_counter()
            results: list[dict[str, float]] = []
            lock = threading.Lock()

            def device(i: int) -> None:
                session = runtimes[i].session_id if runtimes else None
                for j in range(requests):
                    try:
                        r = _one_request(url, self.model, PROMPTS[(i + j) % len(PROMPTS)],
                                         max_tokens, plan.temperature, session, rtt_s)
                    except Exception as e:  # counted in the record; the run goes on
                        logger.error("%s: request failed: %s", system.name, e)
                        continue
                    with lock:
                        results.append(r)

            with concurrent.futures.ThreadPoolExecutor(num_devices) as pool:
                list(pool.map(device, range(num_devices)))
            wall = time.perf_counter() - t0
            after = _spec_counters(scrape_metrics(url))
        finally:
            stats = [rt.stats() for rt in runtimes]
            for rt in runtimes:
                rt.stop()
        if gamma == "auto":  # count only the measured requests' drafts
            stats = [_minus(s, w) for s, w in zip(stats, warm)]
        drafted = after["draft_tokens"] - before["draft_tokens"]
        accepted = after["accepted"] - before["accepted"]
        rounds = after["drafts"] - before["drafts"]
        # Every draft message costs uplink bytes: the drafts for committed sequences, the drafts
        # sent ahead (for the sequence expected next) and the send-ahead branches; bytes per draft
        # token divides all the device's uplink bytes by all the draft tokens they carried.
        sent_tokens = sum(s["draft_tokens_sent"] + s["ahead_tokens_sent"]
                          + s["branch_tokens_sent"] for s in stats)
        sent_bytes = sum(s["client"]["bytes_sent"] for s in stats)
        if not results:
            raise RuntimeError(f"{system.name}: every request of the cell failed (see the log)")
        tps = [r["tokens"] / r["latency"] for r in results]
        gamma_snap = stats[0]["gamma"] if stats else {}
        rec = {
            "experiment": experiment, "system": system.name, "wire": system.wire,
            "uplink_mbps": link.uplink_mbps if link else None,
            "downlink_mbps": link.downlink_mbps if link else None,
            "rtt_ms": link.rtt_ms if link else None,
            "gamma": gamma if system.wire or system is COLOCATED else None,
            "num_devices": num_devices,
            "top_k": system.top_k, "top_p": system.top_p, "candidates": system.candidates,
            "bytes_per_draft_token": sent_bytes / sent_tokens if sent_tokens else None,
            "draft_tokens_sent": sent_tokens,
            "acceptance": accepted / drafted if drafted else None,
            "mean_accepted_length": accepted / rounds if rounds else None,
            "draft_tokens_verified": drafted,
            "tokens_per_s": statistics.mean(tps),
            "server_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "latency_p50_s": _quantile([r["latency"] for r in results], 0.5),
            "latency_p95_s": _quantile([r["latency"] for r in results], 0.95),
            "ttft_p50_s": _quantile([r["ttft"] for r in results], 0.5),
            "edge_step_ms": gamma_snap.get("target_step_ms"),
            "edge_verify_ms_per_token": gamma_snap.get("edge_verify_ms_per_token"),
            "speculation_paused_steps": sum(s["steps_off"] for s in stats) if stats else None,
            "requests": len(results), "max_tokens": max_tokens,
            "errors": requests * num_devices - len(results),
            "wall_s": wall,
        }
        if experiment == "warmup":  # measured, not kept
            return rec
        if system is TARGET_ONLY:
            self.target_only.setdefault((rec["rtt_ms"] or 0.0, num_devices), []).append(
                rec["tokens_per_s"])
        self.records.append(rec)
        return rec

    def _runtime(self, system: System, link: LinkSpec | None, gamma: str):
        from vllm_tslt.agent.config import AgentConfig
        from vllm_tslt.agent.runtime import DraftRuntime

        config = AgentConfig(
            draft_model=str(self.pair.draft), edge=self.hub, api=self.urls["edge"],
            listen="127.0.0.1:0", wire_format=system.wire, top_k=system.top_k,
            top_p=system.top_p, candidates=system.candidates, k_max=64,
            num_draft_tokens=gamma if gamma == "auto" else int(gamma),
            # Sending drafts ahead costs a whole payload per miss: fine for tens of bytes, not for
            # DSD's kilobytes on a narrow uplink. DSD runs without it (its best setting here).
            send_ahead=not (system.wire or "").startswith("dsd"),
            max_draft_tokens=EDGE_GAMMA_MAX, device="cpu", dtype="float32")
        rt = DraftRuntime(config, link=EmulatedLink(link) if link else None)
        rt.start()
        if not rt.wait_session(30):
            rt.stop()
            raise RuntimeError(f"{system.name}: no session from the edge in 30 s "
                               f"({rt.failure or 'handshake timed out'})")
        return rt

    def speedups(self) -> None:
        """speedup_vs_target_only for every record (target-only runs averaged per RTT and N)."""
        for rec in self.records:
            key = (rec["rtt_ms"] or 0.0, rec["num_devices"])
            base = self.target_only.get(key) or self.target_only.get((0.0, rec["num_devices"]))
            ref = statistics.mean(base) if base else None
            rec["target_only_tokens_per_s"] = ref
            rec["speedup_vs_target_only"] = rec["tokens_per_s"] / ref if ref else None


def _minus(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Device counters of a cell without its warm-up request (gamma snapshot: the latest)."""
    out = dict(after)
    for key in ("draft_tokens_sent", "ahead_tokens_sent", "branch_tokens_sent", "steps_off"):
        out[key] = after[key] - before[key]
    out["client"] = {**after["client"],
                     "bytes_sent": after["client"]["bytes_sent"] - before["client"]["bytes_sent"]}
    return out


def _one_request(url: str, model: str, prompt: str, max_tokens: int, temperature: float,
                 session: str | None, rtt_s: float) -> dict[str, float]:
    from openai import OpenAI

    client = _clients.get(url) or _clients.setdefault(
        url, OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0))
    extra: dict[str, Any] = {"ignore_eos": True}
    if session:
        extra["vllm_xargs"] = {"tslt_session": session}
    t0 = time.perf_counter()
    time.sleep(rtt_s / 2)  # the request crosses the uplink
    first = last = None
    tokens = 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=temperature, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        now = time.perf_counter() + rtt_s / 2  # and every chunk the downlink
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or last is None or tokens == 0:
        raise RuntimeError("a benchmark request returned no tokens")
    return {"tokens": tokens, "ttft": first - t0, "latency": last - t0}


_clients: dict[str, Any] = {}


def _spec_counters(metrics: dict[str, float]) -> dict[str, float]:
    out = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
    names = {"vllm:spec_decode_num_drafts_total": "drafts",
             "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens_total": "accepted"}
    for key, value in metrics.items():
        name = names.get(key.split("{")[0])
        if name:
            out[name] += value
    return out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def pin_this_process(cpus: set[int]) -> None:
    import torch

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(1)


def cells(plan: Plan) -> list[tuple[str, System, LinkSpec | None, str, int]]:
    """Every cell of the run in order: (experiment, system, link, gamma, num devices)."""
    out: list[tuple[str, System, LinkSpec | None, str, int]] = []
    for rtt in plan.rtts:
        out.append(("links", TARGET_ONLY, LinkSpec(100.0, plan.downlink_mbps, rtt), "-", 1))
        out.append(("links", COLOCATED, LinkSpec(100.0, plan.downlink_mbps, rtt), "4", 1))
        out.append(("links", EDGE_ALONE, LinkSpec(100.0, plan.downlink_mbps, rtt), "-", 1))
        for up in plan.uplinks:
            link = LinkSpec(up, plan.downlink_mbps, rtt)
            for gamma in plan.gammas:
                out += [("links", s, link, gamma, 1) for s in REMOTE]
        out.append(("links", TARGET_ONLY, LinkSpec(100.0, plan.downlink_mbps, rtt), "-", 1))
    fast = plan.fast_link
    sweep = [replace(TSLT_K, top_k=k) for k in plan.sweep_k]
    sweep += [replace(TSLT_P, top_p=p) for p in plan.sweep_p]
    sweep += [replace(TSLT_MC, candidates=m) for m in plan.sweep_m]
    sweep += [DSD32, DSD16, TKSLT]
    out += [("sweep", s, fast, "4", 1) for s in sweep]
    for n in plan.devices:
        out.append(("devices", TARGET_ONLY, fast, "-", n))
        out.append(("devices", COLOCATED, fast, "4", n))
        out.append(("devices", EDGE_ALONE, fast, "-", n))
        out += [("devices", s, fast, g, n) for s, g in ((TSLT_P, "4"), (TSLT_P, "auto"),
                                                          (DSD16, "4"))]
    return out


def describe(cell: tuple[str, System, LinkSpec | None, str, int]) -> str:
    experiment, system, link, gamma, n = cell
    extra = "".join(f" {k}={v}" for k, v in (("K", system.top_k), ("p", system.top_p),
                                             ("m", system.candidates if system.candidates > 1
                                              else None)) if v is not None)
    where = link.label() if link else "no link"
    return f"{experiment:7s} {system.name}{extra} | {where} | gamma {gamma} | {n} device(s)"
