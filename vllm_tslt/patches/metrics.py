"""Say so when the hubs' counters cannot reach /metrics (vLLM 0.32.0, prometheus multiprocess mode).

With more than one API server process (`--data-parallel-size` > 1 with the internal load balancer
defaults `--api-server-count` to the DP size) vLLM switches prometheus to multiprocess mode, and
/metrics (prometheus-fastapi-instrumentator's handler) answers from a fresh registry per scrape
holding only prometheus' `MultiProcessCollector`: the `vllm_tslt_*` collectors registered on the
default registry are not on it. vLLM builds that route from
`vllm.entrypoints.serve.instrumentator.metrics.get_prometheus_registry` (looked up at call time in
`attach_router`); the wrapper logs, once per process, what to do instead: `--api-server-count 1`
(one API server for every engine, /metrics merges every DP rank's hub) or the hubs' JSON files.
"""

from __future__ import annotations

import functools
import logging

from .patch import Patch

logger = logging.getLogger(__name__)

INSTRUMENTATOR = "vllm.entrypoints.serve.instrumentator.metrics"


def _wrap_get_prometheus_registry(original):
    @functools.wraps(original)
    def get_prometheus_registry():
        from prometheus_client import REGISTRY

        from vllm_tslt.edge.stats import registered_paths

        registry = original()
        paths = registered_paths()
        if registry is not REGISTRY and paths:
            logger.warning(
                "vllm-tslt: /metrics runs in prometheus multiprocess mode (more than one API "
                "server, e.g. --data-parallel-size > 1 with the default --api-server-count), "
                "which leaves out the vllm_tslt_* counters; start with --api-server-count 1 to "
                "see them merged over every DP rank's hub, or read the hubs' files: %s",
                ", ".join(str(p) for p in paths))
        return registry

    return get_prometheus_registry


PATCH = Patch(INSTRUMENTATOR, "get_prometheus_registry", "0.32.0", _wrap_get_prometheus_registry)


def apply() -> bool:
    if PATCH.applied:
        return False
    PATCH.apply()
    return True
