"""The capacity benchmark: closed-loop clients on N devices, dimensionless links, side by side.

Servers, one at a time, pinned to the edge CPUs: target-only vLLM; vLLM with its co-located
``draft_model`` (probabilistic, γ = 4); the TSLT edge (``method: tslt``, fused verifier). Devices:
a ``DeviceFarm`` (vllm_tslt.bench.farm) in this process, pinned with the clients to the device
CPUs: every device is the agent users run, drafting at a modelled ``draft_ms_per_token``.

Each cell runs N closed-loop clients (client i sends request after request, each naming device i's
session) for a warm-up, then a measured window that lasts at least ``min_window_s`` and until the
acceptance's 95% confidence interval is within ``ci_goal`` (at most ``max_window_s``). Links are
set in units of the edge's plain step (``rtt_over_step``), measured at the start of the run as
target-only's median TPOT at batch 1 with no link: RTT = rtt_over_step × step.

The HTTP leg crosses the same emulated link: a request leaves RTT/2 late, every streamed chunk is
stamped RTT/2 after it arrives, and a client sends its next request when its last chunk reaches it
(nothing feeds back from the client's clock into generation, so shifting stamps is exact). The
clients speak HTTP directly (one JSON parse per chunk) to leave the shared core to the farm;
`vllm bench serve` checks them in one cell (capacity_main._external_check).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_tslt.agent.link import LinkSpec
from vllm_tslt.bench.capacity_stats import (  # noqa: F401 (re-exported: the statistics' old home)
    EDGE_TIMES,
    HUB,
    INTAKE,
    MOMENTS,
    acceptance_from_moments,
    acceptance_from_positions,
    counters_delta,
    farm_delta,
    median_of,
    quantile,
    spec_counters,
    sum_device_counters,
    uplink_bytes_per_token,
)
from vllm_tslt.bench.runner import (
    COLOCATED,
    EDGE_ALONE,
    PROMPTS,
    TARGET_ONLY,
    TSLT_K,
    TSLT_P,
    System,
)

logger = logging.getLogger(__name__)

DOWNLINK_MBPS = 100.0
EDGE_GAMMA_MAX = 8
COLOCATED_GAMMA = 4
MIN_ROUNDS = 10  # fewer verified rounds by the window's minimum: speculation is (mostly) off
# The TSLT edge runs `intake: adaptive` (docs/intake.md); a second edge with `intake: wait` (the
# default, every step waits for every draft) serves the same devices for comparison.
SERVERS = ("target", "colocated", "edge", "edge-wait")
TSLT_SYSTEMS = ((TSLT_P, "4"), (TSLT_P, "auto"), (TSLT_K, "4"))
TSLT_P_WAIT = replace(TSLT_P, name="TSLT top-p, intake wait", server="edge-wait")


@dataclass(frozen=True)
class Plan:
    quick: bool
    devices: tuple[int, ...] = (1, 4, 16, 64)
    capacity_rtts: tuple[float, ...] = (0.5, 2.0)  # RTT / plain step
    capacity_uplink_mbps: float = 10.0
    tslt: tuple[tuple[System, str], ...] = TSLT_SYSTEMS
    intake_wait: tuple[tuple[System, str], ...] = ((TSLT_P_WAIT, "auto"),)
    sweep_rtts: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 5.0)
    sweep_uplinks: tuple[float, ...] = (1.0, 10.0, 100.0)
    sweep_gammas: tuple[str, ...] = ("4", "auto")
    max_tokens: int = 64
    temperature: float = 1.0
    warmup_s: float = 3.0
    min_window_s: float = 8.0
    max_window_s: float = 45.0
    ci_goal: float = 0.02  # 95% CI half-width of every reported acceptance
    slo_factor: float = 1.5  # capacity: p95 TPOT within this × target-only's batch-1 TPOT
    external_check: bool = True  # one cell through `vllm bench serve` (vLLM's own client)
    # One-device capacity cells run this many times, in interleaved rounds with every server up
    # side by side (rounds > 1), so each round's ratios compare neighbours in time.
    rounds: int = 1
    colocated_devices: tuple[int, ...] | None = None  # None: every N
    edge_alone: bool = True  # the TSLT edge with no drafts in each capacity cell
    name: str = "full"

    @staticmethod
    def make(quick: bool = False, targets: bool = False, intake: bool = False) -> Plan:
        if intake:
            # Issue 14's intake A/B: one device at RTT 0.5 and 2 × step, the TSLT edge with
            # `intake: adaptive` (γ = 4 and adaptive γ), the edge alone and `intake: wait`, beside
            # target-only in 3 interleaved rounds (no colocated drafting, no link sweep).
            return Plan(False, devices=(1,), tslt=((TSLT_P, "4"), (TSLT_P, "auto")),
                        intake_wait=((TSLT_P_WAIT, "4"),), sweep_rtts=(), colocated_devices=(),
                        min_window_s=8.0, max_window_s=20.0, external_check=False, rounds=3,
                        name="intake")
        if targets:
            # Issue 14's targets: one device at RTT 0.5 and 2 × step in 3 interleaved rounds,
            # 16 devices once, and adaptive γ over the whole link sweep.
            return Plan(False, devices=(1, 16), tslt=((TSLT_P, "4"), (TSLT_P, "auto")),
                        intake_wait=((TSLT_P_WAIT, "4"),),
                        sweep_rtts=(0.25, 0.5, 1.0, 2.0, 5.0), sweep_uplinks=(1.0, 10.0, 100.0),
                        sweep_gammas=("auto",), min_window_s=8.0, max_window_s=20.0,
                        external_check=False, rounds=3, edge_alone=False, name="targets")
        if quick:
            return Plan(True, devices=(1, 16), tslt=((TSLT_P, "4"), (TSLT_P, "auto")),
                        intake_wait=(),
                        sweep_rtts=(0.25, 1.0, 5.0), sweep_uplinks=(10.0,), sweep_gammas=("4",),
                        warmup_s=2.0, min_window_s=6.0, max_window_s=25.0, name="quick")
        return Plan(False)

    @property
    def interleaved(self) -> bool:
        return self.rounds > 1


@dataclass(frozen=True)
class Cell:
    experiment: str  # "calibration", "capacity" or "sweep"
    system: System
    gamma: str  # "4", "auto" or "-" (no drafts)
    num_devices: int
    rtt_over_step: float
    uplink_mbps: float
    round: int = 0  # interleaved plans: which round of a repeated cell

    @property
    def repeated(self) -> bool:
        """Run once per round in an interleaved plan: the one-device capacity cells."""
        return self.experiment == "capacity" and self.num_devices == 1

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("K", self.system.top_k),
                                                 ("p", self.system.top_p)) if v is not None)
        return (f"{self.experiment:8s} {self.system.name}{extra} | gamma {self.gamma} | "
                f"N={self.num_devices} | RTT {self.rtt_over_step:g}x step, "
                f"{self.uplink_mbps:g} Mbit/s up" + (f" | round {self.round + 1}"
                                                     if self.repeated and self.round else ""))


def cells(plan: Plan) -> list[Cell]:
    """Every cell after the calibration, grouped by server (the run starts each server once)."""
    up = plan.capacity_uplink_mbps
    out: list[Cell] = []
    for r in plan.capacity_rtts:
        for n in plan.devices:
            out.append(Cell("capacity", TARGET_ONLY, "-", n, r, up))
            if plan.colocated_devices is None or n in plan.colocated_devices:
                out.append(Cell("capacity", COLOCATED, str(COLOCATED_GAMMA), n, r, up))
            if plan.edge_alone:
                out.append(Cell("capacity", EDGE_ALONE, "-", n, r, up))
            out += [Cell("capacity", s, g, n, r, up) for s, g in (*plan.tslt, *plan.intake_wait)]
    out += [Cell("sweep", TARGET_ONLY, "-", 1, r, 100.0) for r in plan.sweep_rtts
            if r not in plan.capacity_rtts]  # the sweep's reference at each RTT
    for r in plan.sweep_rtts:
        for link_up in plan.sweep_uplinks:
            for g in plan.sweep_gammas:
                if r in plan.capacity_rtts and link_up == up and (TSLT_P, g) in plan.tslt:
                    continue  # the capacity experiment's N = 1 cell is this cell
                out.append(Cell("sweep", TSLT_P, g, 1, r, link_up))
    if plan.interleaved:  # servers side by side: rounds of the one-device cells first
        once = [c for c in out if not c.repeated]
        return [replace(c, round=i) for i in range(plan.rounds)
                for c in out if c.repeated] + once
    return sorted(out, key=lambda c: SERVERS.index(c.system.server))  # stable: order kept


# ---------------------------------------------------------------------------------------------
# Closed-loop clients
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    """What the clients saw: token arrival stamps and finished requests, in client time."""

    start: float = math.inf
    stop: float = math.inf
    stamps: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens) per chunk
    requests: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0


async def _client(http: Any, url: str, model: str, i: int, session: str | None, plan: Plan,
                  rtt_s: float, window: Window, stopping: asyncio.Event) -> None:
    """One closed-loop client: vLLM's streaming completions API over raw HTTP (a JSON parse per
    chunk; the openai client's typed chunks cost this process' single core several times more
    at 64 clients, time the device farm beside it needs). `token_ids` counts tokens per chunk."""
    body: dict[str, Any] = {"model": model, "max_tokens": plan.max_tokens, "stream": True,
                            "temperature": plan.temperature, "ignore_eos": True,
                            "return_token_ids": True}
    if session:
        body["vllm_xargs"] = {"tslt_session": session}
    j = 0
    while not stopping.is_set():
        await asyncio.sleep(rtt_s / 2)  # the request crosses the uplink
        t0 = time.perf_counter() - rtt_s / 2
        first = last = None
        tokens = 0
        try:
            async with http.stream("POST", url + "/v1/completions",
                                   json={**body, "prompt": PROMPTS[(i + j) % len(PROMPTS)]}
                                   ) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue  # blank separators and "data: [DONE]"
                    now = time.perf_counter() + rtt_s / 2  # and every chunk the downlink
                    choices = json.loads(line[6:]).get("choices")
                    ids = choices[0].get("token_ids") if choices else None
                    if ids:
                        first = first or now
                        last = now
                        tokens += len(ids)
                        window.stamps.append((now, len(ids)))
        except Exception as e:  # counted in the record; the cell goes on
            logger.error("request failed: %s", e)
            window.errors += 1
            await asyncio.sleep(0.2)
            continue
        j += 1
        if first is not None and last is not None and tokens > 1:
            window.requests.append({"t0": t0, "end": last, "tokens": tokens,
                                    "ttft": first - t0, "latency": last - t0,
                                    "tpot": (last - first) / (tokens - 1)})
        if last is not None:  # the last chunk reaches the client at `last`; it sends at once
            await asyncio.sleep(max(0.0, last - time.perf_counter()))


async def closed_loop(url: str, model: str, sessions: list[str | None], plan: Plan, rtt_s: float,
                      ci_now: Callable[[], float | None], on_start: Callable[[], None]) -> Window:
    """Run len(sessions) closed-loop clients: warm-up, then the measured window (see module doc).
    ``on_start()`` runs when the window opens; ``ci_now()`` -> the acceptance's current 95% CI
    half-width (None: this system has no acceptance to measure); both scrape the server's
    /metrics, in a thread, so the clients' event loop never waits on them."""
    import httpx

    limits = httpx.Limits(max_connections=len(sessions) + 4,
                          max_keepalive_connections=len(sessions) + 4)
    window = Window()
    stopping = asyncio.Event()
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        tasks = [asyncio.create_task(_client(http, url, model, i, s, plan, rtt_s, window,
                                             stopping)) for i, s in enumerate(sessions)]
        try:
            await asyncio.sleep(plan.warmup_s)
            window.start = time.perf_counter()
            await asyncio.to_thread(on_start)
            while True:
                await asyncio.sleep(0.5)
                elapsed = time.perf_counter() - window.start
                if elapsed >= plan.max_window_s:
                    break
                if elapsed >= plan.min_window_s:
                    ci = await asyncio.to_thread(ci_now)
                    if ci is None or ci <= plan.ci_goal:
                        break
            window.stop = time.perf_counter()
            stopping.set()
            await asyncio.wait(tasks, timeout=120)
        finally:
            for t in tasks:
                t.cancel()
    return window


def summarise_window(window: Window) -> dict[str, Any]:
    dur = window.stop - window.start
    in_window = sum(n for t, n in window.stamps if window.start <= t <= window.stop)
    done = [r for r in window.requests if r["t0"] >= window.start and r["end"] <= window.stop]
    if len(done) < 3:  # long requests at low throughput: use every request that ended inside
        done = [r for r in window.requests if window.start <= r["end"] <= window.stop]
    tpot = [1e3 * r["tpot"] for r in done]
    return {"server_tokens_per_s": in_window / dur if dur > 0 else None,
            "tokens_in_window": in_window, "window_s": dur, "requests": len(done),
            "tpot_p50_ms": quantile(tpot, 0.5), "tpot_p95_ms": quantile(tpot, 0.95),
            "ttft_p50_ms": quantile([1e3 * r["ttft"] for r in done], 0.5),
            "tokens_per_s_per_client": statistics.mean(r["tokens"] / r["latency"] for r in done)
            if done else None,
            "errors": window.errors}


# ---------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------


class CapacityBench:
    def __init__(self, pair: Any, plan: Plan, hub: str, draft_ms_per_token: float) -> None:
        self.pair, self.plan, self.hub = pair, plan, hub
        self.hubs: dict[str, str] = {}  # server -> its hub endpoint, when servers run side by side
        self.draft_ms = draft_ms_per_token
        self._drafters: dict[tuple, Any] = {}  # one per truncation setting, shared by every farm
        self.model = str(pair.target)
        self.step_ms: float | None = None  # target-only TPOT at batch 1, no link
        self.records: list[dict[str, Any]] = []

    def link(self, cell: Cell) -> LinkSpec:
        rtt = cell.rtt_over_step * (self.step_ms or 0.0)
        return LinkSpec(cell.uplink_mbps, DOWNLINK_MBPS, rtt)

    def run_cell(self, cell: Cell, url: str) -> dict[str, Any]:
        from vllm_tslt.bench.farm import DeviceFarm
        from vllm_tslt.edge.launch import scrape_metrics

        link = self.link(cell)
        rtt_s = link.rtt_ms / 1e3
        farm = None
        if cell.system.wire:
            farm = DeviceFarm(self._agent_config(cell, url), cell.num_devices, link,
                              self.draft_ms, drafter=self.drafter_for(cell)).start()
            if not farm.wait_sessions(30):
                farm.stop()
                raise RuntimeError(f"{cell.label()}: devices got no session in 30 s "
                                   f"({farm.failure or 'handshake timed out'})")
        sessions: list[str | None] = farm.session_ids if farm else [None] * cell.num_devices
        before: dict[str, Any] = {}
        farm_before: dict[str, Any] = {}

        def on_start() -> None:
            before.update(spec_counters(scrape_metrics(url)))
            if farm is not None:
                farm_before.update(farm.stats.snapshot())

        def ci_now() -> float | None:
            if not (farm is not None or cell.system is COLOCATED) or not before:
                return None
            delta = counters_delta(spec_counters(scrape_metrics(url)), before)
            if delta["verify_rounds" if farm is not None else "drafts"] < MIN_ROUNDS:
                return None  # speculation off (adaptive γ): no acceptance to measure
            ci = self._acceptance(cell, delta)[1]
            return math.inf if ci is None else ci

        try:
            window = asyncio.run(closed_loop(url, self.model, sessions, self.plan, rtt_s, ci_now,
                                             on_start))
            after = spec_counters(scrape_metrics(url))
            device_stats = [rt.stats() for rt in farm.runtimes] if farm else []
            farm_stats = farm.stats.snapshot() if farm else None
        finally:
            if farm is not None:
                farm.stop()
        delta = counters_delta(after, before)
        alpha, ci, n_tokens = self._acceptance(cell, delta)
        summary = summarise_window(window)
        steps = delta["steps"]
        gamma_snaps = [s["gamma"] for s in device_stats]
        rec = {
            "experiment": cell.experiment, "round": cell.round, "system": cell.system.name,
            "wire": cell.system.wire,
            "gamma": cell.gamma, "num_devices": cell.num_devices, "top_k": cell.system.top_k,
            "top_p": cell.system.top_p, "rtt_over_step": cell.rtt_over_step,
            "rtt_ms": link.rtt_ms, "uplink_mbps": link.uplink_mbps,
            "downlink_mbps": link.downlink_mbps, "plain_step_ms": self.step_ms,
            "device_draft_ms_per_token": self.draft_ms if farm else None,
            **summary,
            "acceptance": alpha, "acceptance_ci95": ci, "acceptance_draft_tokens": n_tokens,
            "acceptance_rounds": int(delta["verify_rounds"] if farm else delta["drafts"]),
            "acceptance_moments": {k: delta[k] for k in MOMENTS} if farm else None,
            "server_acceptance": delta["accepted"] / delta["draft_tokens"]
            if delta["draft_tokens"] else None,
            "edge_steps": steps,
            "edge_step_ms": 1e3 * summary["window_s"] / steps if steps else None,
            "draft_tokens_per_step": delta["draft_tokens"] / steps if steps else None,
            "edge_wait_ms_per_step": delta["draft_wait_microseconds"] / 1e3
            / delta["proxy_steps"] if delta["proxy_steps"] else None,
            "edge_proxy_ms_per_step": delta["proxy_overhead_microseconds"] / 1e3
            / delta["proxy_steps"] if delta["proxy_steps"] else None,
            "edge_plain_step_ms_reported": median_of(g.get("target_step_ms") for g in gamma_snaps),
            "edge_verify_ms_per_token": median_of(g.get("edge_verify_ms_per_token")
                                                   for g in gamma_snaps),
            "speculation_paused_steps": sum(s["steps_off"] for s in device_stats)
            if farm else None,
            "uplink_bytes_per_draft_token": uplink_bytes_per_token(device_stats),
            "farm": farm_delta(farm_stats, farm_before) if farm_stats else None,
            "device_counters": sum_device_counters(device_stats) if farm else None,
            "intake": {k: int(delta[k]) for k in INTAKE} if farm else None,
            "hub": {k: int(delta[k]) for k in HUB} if farm else None,
        }
        self.records.append(rec)
        return rec

    @staticmethod
    def _acceptance(cell: Cell, delta: dict[str, Any]) -> tuple[float | None, float | None, int]:
        if cell.system.wire:
            return acceptance_from_moments(delta)
        if cell.system is COLOCATED:
            return acceptance_from_positions(delta["drafts"], delta["per_pos"], COLOCATED_GAMMA)
        return None, None, 0

    def drafter_for(self, cell: Cell) -> Any:
        """The draft model with the cell's truncation (a Drafter holds its SparsifyConfig)."""
        from vllm_tslt.agent.drafter import Drafter

        config = self._agent_config(cell, "http://127.0.0.1:1")
        key = (config.wire_format, config.sparsify_config())
        if key not in self._drafters:
            self._drafters[key] = Drafter(config.draft_model, "cpu", "float32",
                                          config.sparsify_config(), 1,
                                          wire_format=config.wire_format)
        return self._drafters[key]

    def _agent_config(self, cell: Cell, url: str) -> Any:
        from vllm_tslt.agent.config import AgentConfig

        return AgentConfig(
            draft_model=str(self.pair.draft), edge=self.hubs.get(cell.system.server, self.hub),
            api=url, listen="127.0.0.1:0",
            wire_format=cell.system.wire or "tslt", top_k=cell.system.top_k,
            top_p=cell.system.top_p, k_max=64,
            num_draft_tokens=cell.gamma if cell.gamma == "auto" else int(cell.gamma),
            max_draft_tokens=EDGE_GAMMA_MAX, device="cpu", dtype="float32")


def calibration_cell() -> Cell:
    return Cell("calibration", TARGET_ONLY, "-", 1, 0.0, 100.0)


def with_rtt(cell: Cell, rtt_over_step: float) -> Cell:
    return replace(cell, rtt_over_step=rtt_over_step)
