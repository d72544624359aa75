"""A device farm: N virtual devices in one process, their draft forwards batched into one.

Each virtual device is the agent users run (``DraftRuntime``: its own edge session, requests, KV
caches, sampler seeds and ``EmulatedLink``); the farm only replaces the runtime's thread. All
devices share one ``Drafter`` (one copy of the weights), and every loop iteration extends the chains
of *every* device that is free to draft with one batched forward (``Drafter.extend`` batches
single-token feeds), so 64 devices cost about one forward per iteration instead of 64.

Device hardware is a parameter, not an accident of the emulator's CPU: a device that starts a chain
extension at time t is busy until t + ``draft_ms_per_token`` (modelled), and what it drafted becomes
visible (is sent) only then. Messages from the edge wait while the device is busy, as they would
for a device inside a forward pass. The real forward runs at the start of the modelled interval; if
it takes longer than the interval the emulator, not the device model, sets the pace: the farm
counts those *overruns* so a report can say when its numbers measure the emulator.

Single-threaded: one loop (``start()`` runs it in a daemon thread) owns every runtime.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.drafter import Drafter
from vllm_tslt.agent.link import EmulatedLink, LinkSpec
from vllm_tslt.agent.runtime import DraftRuntime

logger = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.05  # every device's timers (handshake, silence) advance at least this often
MAX_WAIT_S = 0.02  # the loop's longest sleep when nothing is due


@dataclass
class _Device:
    runtime: DraftRuntime
    busy_until: float = 0.0  # modelled end of the chain extension in progress
    drafting: bool = False  # an extension is in progress (after_extend is due at busy_until)
    serviced_at: float = 0.0


@dataclass
class FarmStats:
    iterations: int = 0
    forwards: int = 0  # batched extensions (one Drafter.extend call each)
    states_extended: int = 0
    overruns: int = 0  # forwards that took longer than the modelled time per token
    forward_s: list[float] = field(default_factory=list)  # real time per batched forward
    # How long after its modelled end a device's extension was actually finished (sent): the
    # emulator's own delay on top of the device model (its loop, the real forward, the GIL).
    lateness_s: list[float] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        f, late = self.forward_s, sorted(self.lateness_s)
        return {"iterations": self.iterations, "forwards": self.forwards,
                "states_extended": self.states_extended, "overruns": self.overruns,
                "overrun_fraction": self.overruns / self.forwards if self.forwards else 0.0,
                "forward_ms_p50": 1e3 * statistics.median(f) if f else None,
                "forward_ms_max": 1e3 * max(f) if f else None,
                "mean_batch": self.states_extended / self.forwards if self.forwards else None,
                "lateness_ms_p50": 1e3 * late[len(late) // 2] if late else None,
                "lateness_ms_p95": 1e3 * late[int(0.95 * (len(late) - 1))] if late else None}


class DeviceFarm:
    """``num_devices`` agents with their own links and sessions, drafting with one model."""

    def __init__(self, config: AgentConfig, num_devices: int, link: LinkSpec | None,
                 draft_ms_per_token: float, drafter: Drafter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        if not draft_ms_per_token >= 0:
            raise ValueError(f"draft_ms_per_token must be >= 0, got {draft_ms_per_token!r}")
        self.drafter = drafter or Drafter(
            config.draft_model, config.device, config.dtype, config.sparsify_config(),
            config.candidates, wire_format=config.wire_format)
        self.draft_s = draft_ms_per_token / 1e3
        self.clock = clock
        self.devices = [_Device(DraftRuntime(config, drafter=self.drafter,
                                             link=EmulatedLink(link) if link else None))
                        for _ in range(num_devices)]
        self.stats = FarmStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------

    @property
    def runtimes(self) -> list[DraftRuntime]:
        return [d.runtime for d in self.devices]

    @property
    def session_ids(self) -> list[str]:
        return [d.runtime.session_id for d in self.devices]

    def start(self) -> DeviceFarm:
        self._thread = threading.Thread(target=self._run, name="tslt-device-farm", daemon=True)
        self._thread.start()
        return self

    def wait_sessions(self, timeout_s: float) -> bool:
        """True once every device has a session; False at the deadline or if the loop died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.session_ids):
                return True
            if self.failure is not None:
                return False
            time.sleep(0.01)
        return all(self.session_ids)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("device farm loop did not stop within %.1f s", timeout_s)
        for d in self.devices:
            d.runtime.client.close()

    def __enter__(self) -> DeviceFarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once()
        except Exception as e:  # a bug must not go silent: record it, log it, stop drafting
            logger.exception("device farm loop failed")
            self.failure = e

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def run_once(self) -> None:
        """Finish due extensions, take the edge's messages, start one batched extension, wait."""
        now = self.clock()
        self.stats.iterations += 1
        readable = self._readable()
        starting: list[_Device] = []
        for d in self.devices:
            if d.drafting:
                if now < d.busy_until:
                    continue  # inside its modelled forward pass: messages wait
                d.drafting = False
                self.stats.lateness_s.append(now - d.busy_until)
                d.runtime.after_extend()
            rt = d.runtime
            link = rt.client.link
            due = link is not None and (link.next_due() or float("inf")) <= now
            if (rt.client.socket is None or rt.client.socket in readable or due
                    or now - d.serviced_at >= HOUSEKEEPING_S or rt._has_work()):
                rt.service(0.0)
                d.serviced_at = now
            if rt.next_batch():
                starting.append(d)
            else:
                rt.after_extend()
        if starting:
            self._extend(starting, now)
        self._wait()

    def _extend(self, starting: list[_Device], now: float) -> None:
        states = [s for d in starting for s in d.runtime.next_batch()]
        t0 = time.perf_counter()
        self.drafter.extend(states)
        real = time.perf_counter() - t0
        st = self.stats
        st.forwards += 1
        st.states_extended += len(states)
        st.overruns += int(real > self.draft_s)
        st.forward_s.append(real)
        for samples in (st.forward_s, st.lateness_s):
            if len(samples) > 100_000:
                del samples[:50_000]
        for d in starting:
            # The device's own model of itself: one chain token per draft_ms_per_token.
            d.runtime.gamma_ctl.observe_draft(1, self.draft_s)
            d.busy_until = now + self.draft_s
            d.drafting = True

    def _readable(self) -> set[zmq.Socket]:
        poller = zmq.Poller()
        for d in self.devices:
            if d.runtime.client.socket is not None:
                poller.register(d.runtime.client.socket, zmq.POLLIN)
        return {s for s, _ in poller.poll(0)}

    def _wait(self) -> None:
        """Sleep until a device's extension ends, a link delivers, or a socket has a message."""
        now = self.clock()
        wake = now + MAX_WAIT_S
        poller = zmq.Poller()
        for d in self.devices:
            rt = d.runtime
            if d.drafting:
                wake = min(wake, d.busy_until)
                continue
            if rt._has_work():
                return  # more drafting to start at once
            if rt.client.link is not None:
                wake = min(wake, rt.client.link.next_due() or wake)
            if rt.client.socket is not None:
                poller.register(rt.client.socket, zmq.POLLIN)
        timeout_ms = max(0.0, (wake - now) * 1e3)
        if timeout_ms > 0:
            poller.poll(timeout_ms)


def measure_draft_ms_per_token(drafter: Drafter, context: int = 64, repeats: int = 40) -> float:
    """Median wall time of one single-request chain extension (forward + sparsify-then-sample) at
    ``context`` tokens of context: the default device speed (this machine's CPU as one device)."""
    state = drafter.new_state("farm-calibration", list(range(1, context + 1)),
                              {"temperature": 1.0})
    drafter.extend([state])  # prefill
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        drafter.extend([state])
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
