"""Hub counters -> a JSON file (worker process) -> Prometheus metrics on vLLM's /metrics (API server).

The hub lives in the engine's worker process while /metrics is served by the API server process, so
the worker writes a snapshot file every half second (atomic rename) and a collector registered in the
API server reads it at scrape time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
INTERVAL_S = 0.5


def default_stats_path(bind: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", bind)
    return Path(tempfile.gettempdir()) / f"vllm-tslt-hub-{safe}.json"


class StatsWriter:
    def __init__(self, hub: Any, path: str | None) -> None:
        self.hub = hub
        self.path = Path(path) if path else default_stats_path(hub.config.bind)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tslt-stats", daemon=True)

    def start(self) -> StatsWriter:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def write_once(self) -> None:
        snap = self.hub.snapshot()
        snap["endpoint"] = self.hub.endpoint
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(snap))
        tmp.replace(self.path)

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self.write_once()
            except OSError as exc:  # a full disk must not take the engine down
                logger.warning("cannot write TSLT stats to %s: %s", self.path, exc)


# (metric name, snapshot key, help); counters are exposed with Prometheus' _total suffix.
COUNTERS = (
    ("vllm_tslt_uplink_bytes", "uplink_bytes", "Bytes received from devices"),
    ("vllm_tslt_downlink_bytes", "downlink_bytes", "Bytes sent to devices"),
    ("vllm_tslt_drafts_received", "drafts_received", "Draft messages received"),
    ("vllm_tslt_drafts_used", "drafts_used", "Drafts handed to the scheduler"),
    ("vllm_tslt_drafts_ahead", "drafts_ahead",
     "Drafts received for a prefix longer than the committed one (sent ahead, branches)"),
    ("vllm_tslt_drafts_ahead_bytes", "drafts_ahead_bytes", "Uplink bytes of drafts sent ahead"),
    ("vllm_tslt_drafts_ahead_hits", "drafts_ahead_hits",
     "Drafts sent ahead whose assumed prefix the engine committed (waiting at the edge)"),
    ("vllm_tslt_drafts_ahead_misses", "drafts_ahead_misses",
     "Drafts sent ahead whose assumed prefix did not come true"),
    ("vllm_tslt_drafts_ahead_evicted", "drafts_ahead_evicted",
     "Drafts sent ahead dropped because a request had too many pending"),
    ("vllm_tslt_pauses", "pauses", "Pause messages from devices (adaptive speculation off)"),
    ("vllm_tslt_commits_held", "commits_held",
     "Commits to paused devices held back and sent coalesced (PAUSED_COMMIT_INTERVAL_S)"),
    ("vllm_tslt_draft_tokens_verified", "draft_tokens_verified",
     "Draft tokens verified against the device's sparse q"),
    ("vllm_tslt_verify_rounds", "verify_rounds", "Steps that verified a device's draft"),
    ("vllm_tslt_round_draft_tokens", "round_draft_tokens",
     "Sum over verified rounds of the draft tokens handed out (d)"),
    ("vllm_tslt_round_accepted", "round_accepted", "Sum over verified rounds of accepted tokens (a)"),
    ("vllm_tslt_round_accepted_sq", "round_accepted_sq", "Sum over verified rounds of a squared"),
    ("vllm_tslt_round_accepted_x_draft", "round_accepted_x_draft",
     "Sum over verified rounds of a times d"),
    ("vllm_tslt_round_draft_sq", "round_draft_sq", "Sum over verified rounds of d squared"),
    ("vllm_tslt_draft_rows_one_hot", "draft_rows_one_hot",
     "Scheduled draft tokens verified with the one-hot fallback"),
    ("vllm_tslt_draft_wait_microseconds", "wait_us", "Time engine steps waited for drafts"),
    ("vllm_tslt_proxy_overhead_microseconds", "proxy_overhead_us",
     "Proxy time per step outside the wait"),
    ("vllm_tslt_proxy_steps", "proxy_steps", "Engine steps that ran the proxy"),
    ("vllm_tslt_requests_bound", "requests_bound", "Requests bound to a device session"),
    ("vllm_tslt_requests_without_session", "requests_without_session",
     "Requests that named no tslt_session (the edge decoded alone)"),
    ("vllm_tslt_sessions_closed_abuse", "sessions_closed_abuse",
     "Sessions closed for repeated invalid or over-limit messages"),
    ("vllm_tslt_internal_errors", "internal_errors",
     "Exceptions while handling one device message (the hub kept running)"),
    ("vllm_tslt_intake_waits", "intake_waits",
     "Engine steps that waited for drafts in flight (speculative_config.intake)"),
    ("vllm_tslt_intake_waited_requests", "intake_waited_requests",
     "Requests a step waited for"),
    ("vllm_tslt_intake_wait_misses", "intake_wait_misses",
     "Requests waited for whose draft did not come within the wait"),
    ("vllm_tslt_intake_parks", "intake_parks",
     "Request-steps left out of the batch while their draft was in flight"),
    ("vllm_tslt_intake_plain", "intake_plain",
     "Request-steps decoded plainly because waiting or parking did not pay"),
    ("vllm_tslt_intake_parked_plain", "intake_parked_plain",
     "Parked requests that went back to plain decoding without their draft"),
    ("vllm_tslt_intake_parked_drafted", "intake_parked_drafted",
     "Parked requests whose draft came: verified with it in the step after"),
    ("vllm_tslt_tp_divergent_steps", "tp_divergent_steps",
     "Steps whose sampled tokens differed between TP ranks (speculative_config.tp_check)"),
)
DROP_PREFIXES = ("dropped_", "invalid_", "handshake_refused_", "requests_unknown_session",
                 "requests_over_session_limit")


class HubMetricsCollector:
    """prometheus_client custom collector reading the workers' snapshot files: one per hub (with
    data parallelism one per DP rank), numbers summed."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths

    def read(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for path in self.paths:
            try:
                snap = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for key, value in snap.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    merged[key] = merged.get(key, 0) + value
        return merged

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.read()
        for name, key, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(snap.get(key, 0)))
        dropped = CounterMetricFamily("vllm_tslt_drafts_dropped",
                                      "Drafts or requests without a usable draft, by reason",
                                      labels=["reason"])
        for key, value in sorted(snap.items()):
            if key.startswith(DROP_PREFIXES):
                dropped.add_metric([key], float(value))
        yield dropped
        anomalies = CounterMetricFamily("vllm_tslt_engine_anomalies",
                                        "Hub calls from the engine step that met an internal "
                                        "anomaly (the request decoded without drafts), by kind",
                                        labels=["kind"])
        for key, value in sorted(snap.items()):
            if key.startswith("anomaly_"):
                anomalies.add_metric([key[len("anomaly_"):]], float(value))
        yield anomalies
        yield GaugeMetricFamily("vllm_tslt_sessions_active", "Connected device sessions",
                                value=float(snap.get("sessions_active", 0)))
        yield GaugeMetricFamily("vllm_tslt_requests_active", "Requests bound to a session",
                                value=float(snap.get("requests_active", 0)))


_registered: dict[str, HubMetricsCollector] = {}


def registered_paths() -> list[Path]:
    """Every hub stats file whose counters this process serves on /metrics."""
    return [path for collector in _registered.values() for path in collector.paths]


def register_metrics(*paths: Path) -> None:
    """Register one collector for these paths, once per path set in this process (the API
    server's registry)."""
    key = "|".join(str(p) for p in paths)
    if key in _registered:
        return
    from prometheus_client import REGISTRY

    collector = HubMetricsCollector(*paths)
    REGISTRY.register(collector)
    _registered[key] = collector
