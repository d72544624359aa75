"""The edge under vLLM's distributed engine: tensor, data and (refused) pipeline parallelism.

- **TP > 1.** Every TP rank builds its own proposer, but only the output rank (TP rank 0 with
  PP = 1) hands draft ids to the scheduler, and every rank runs the rejection sampler with
  identical seeded uniforms. So TP rank 0 alone owns the hub (sockets, sessions, stats, tokenizer
  fingerprint), and the q̃ rows it builds for a step are broadcast to the other ranks
  (`share_from_rank0`), which verify with bit-identical inputs (DESIGN.md rule 9). The broadcast
  is a collective: every rank calls it in every step that verifies drafts, in the same order —
  rank 0 broadcasts `None` ("no draft": one-hot rows everywhere) when building the rows failed,
  never skips. `check_sampled` (``speculative_config.tp_check``, off by default) compares the
  ranks' sampled tokens each step.
- **DP > 1.** One engine (and hub) per DP rank. Each hub binds ``port + data_parallel_index``
  (`rank_bind`) and writes its own stats file (`rank_stats_path`); the API server merges the files
  of the ranks it serves. The handshake tells a device which ``X-data-parallel-rank`` header
  routes its requests to that rank (`route_rank`). A request routed elsewhere names a session the
  other rank's hub does not know, so it decodes without drafts: still exact.
- **PP > 1.** vLLM 0.32's V1 runner breaks speculative decoding with pipeline parallelism for
  every method, so `refuse_pipeline_parallel` stops the server at start.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .config import TsltConfig, TsltConfigError

logger = logging.getLogger(__name__)

ROUTE_HEADER = "X-data-parallel-rank"  # vLLM 0.32 serving: the engine a request goes to
ROUTE_LIMIT_KEY = "data_parallel_rank"  # Handshake.limits key: that header's value for a device
# additional_config key: the deployment's DP size, as the API server saw it (a dense model's DP
# engine is reconfigured as DP = 1 before its workers start, so they cannot tell otherwise).
DP_SIZE_KEY = "tslt_data_parallel_size"
T = TypeVar("T")


def refuse_pipeline_parallel(pipeline_parallel_size: int) -> None:
    if pipeline_parallel_size > 1:
        raise TsltConfigError(
            f"speculative_config.method 'tslt' cannot run with --pipeline-parallel-size "
            f"{pipeline_parallel_size}: vLLM 0.32's model runner breaks speculative decoding with "
            "pipeline parallelism for every method. Use --tensor-parallel-size to split the "
            "target across GPUs (also across nodes) and --data-parallel-size to add engines.")


def rank_bind(bind: str, data_parallel_index: int) -> str:
    """The hub endpoint of DP rank `data_parallel_index`: tcp port + index (port 0 stays 0, any
    free port), ipc path + ``-dp<index>``. Rank 0 binds `bind` itself."""
    if data_parallel_index == 0:
        return bind
    if bind.startswith("tcp://"):
        host, _, port = bind.rpartition(":")
        return bind if int(port) == 0 else f"{host}:{int(port) + data_parallel_index}"
    return f"{bind}-dp{data_parallel_index}"


def rank_stats_path(options: dict[str, Any], data_parallel_index: int) -> Path:
    """Where DP rank `data_parallel_index`'s hub writes its counters (options: TsltConfig dict)."""
    from .stats import default_stats_path

    path = options.get("stats_path")
    if not path:
        return default_stats_path(rank_bind(options["bind"], data_parallel_index))
    if data_parallel_index == 0:
        return Path(path)
    p = Path(path)
    return p.with_name(f"{p.stem}.dp{data_parallel_index}{p.suffix}")


def served_data_parallel_ranks(parallel_config: Any) -> range:
    """The DP ranks whose engines the API server building this config talks to (vLLM 0.32
    `ParallelConfig` as `EngineArgs.create_engine_config` builds it, before the engines start)."""
    size = int(getattr(parallel_config, "data_parallel_size", 1) or 1)
    if size <= 1:
        return range(1)
    start = int(getattr(parallel_config, "data_parallel_rank", 0) or 0)
    if getattr(parallel_config, "data_parallel_external_lb", False):
        return range(start, start + 1)
    if getattr(parallel_config, "data_parallel_hybrid_lb", False):
        local = int(getattr(parallel_config, "data_parallel_size_local", 1) or 1)
        return range(start, start + local)
    return range(size)  # internal LB: one API server for every engine (remote ones' files absent)


def route_rank(parallel_config: Any, data_parallel_size: int) -> int | None:
    """The ``X-data-parallel-rank`` value that routes a request to this engine (worker-side
    `ParallelConfig`), or None where no header should be sent: DP = 1, or an external load
    balancer (each engine has its own API server). Internal LB takes the global DP rank,
    hybrid LB (`--data-parallel-hybrid-lb`) the engine's index on its node."""
    if data_parallel_size <= 1 or getattr(parallel_config, "data_parallel_external_lb", False):
        return None
    if getattr(parallel_config, "data_parallel_hybrid_lb", False):
        return int(getattr(parallel_config, "data_parallel_rank_local", 0) or 0)
    return int(getattr(parallel_config, "data_parallel_index", 0) or 0)


@dataclass
class EdgeParallel:
    """This worker's place in the engine: TP rank and size, DP rank, the header that routes to it."""

    tp_rank: int = 0
    tp_size: int = 1
    data_parallel_index: int = 0
    route: int | None = None
    tp_check: bool = False
    _group: Any = None  # vLLM's GroupCoordinator for the TP group (TP > 1 only)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, config: TsltConfig) -> EdgeParallel:
        parallel = vllm_config.parallel_config
        refuse_pipeline_parallel(int(getattr(parallel, "pipeline_parallel_size", 1) or 1))
        tp_size = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        group, tp_rank = None, 0
        if tp_size > 1:
            from vllm.distributed.parallel_state import get_tp_group

            group = get_tp_group()
            tp_rank = int(group.rank_in_group)
        dp_size = max(int((vllm_config.additional_config or {}).get(DP_SIZE_KEY, 1)),
                      int(getattr(parallel, "data_parallel_size", 1) or 1))
        return cls(tp_rank, tp_size, int(getattr(parallel, "data_parallel_index", 0) or 0),
                   route_rank(parallel, dp_size), bool(config.tp_check), group)

    @property
    def owns_hub(self) -> bool:
        """TP rank 0: the output rank (PP = 1), whose draft ids reach the scheduler."""
        return self.tp_rank == 0

    def handshake_limits(self) -> dict[str, int]:
        """What the handshake tells a device about its engine: the ``X-data-parallel-rank``
        value that routes its requests here (absent: send no header)."""
        return {} if self.route is None else {ROUTE_LIMIT_KEY: self.route}

    def rank_config(self, config: TsltConfig, options: dict[str, Any]) -> TsltConfig:
        """The config of this DP rank's hub: its own endpoint and stats file."""
        import dataclasses

        if self.data_parallel_index == 0:
            return config
        return dataclasses.replace(
            config, bind=rank_bind(config.bind, self.data_parallel_index),
            stats_path=str(rank_stats_path(options, self.data_parallel_index)))

    def share_from_rank0(self, build: Callable[[], T], on_error: Callable[[BaseException], None]
                         ) -> T | None:
        """`build()` on TP rank 0, its result on every rank (a TP collective: call it on every
        rank, in the same order). None when `build` raised (`on_error` was told) — every rank then
        falls back together."""
        result: T | None = None
        if self.owns_hub:
            try:
                result = build()
            except Exception as exc:  # a broken row must not hang the other ranks or the engine
                on_error(exc)
                result = None
        if self.tp_size == 1:
            return result
        return self._group.broadcast_object(result, src=0)

    def check_sampled(self, sampled: list[list[int]]) -> list[int] | None:
        """Debug check (``tp_check``): the TP ranks whose sampled tokens differ from rank 0's this
        step (empty: none), on every rank; None when the check is off (a TP collective)."""
        if not self.tp_check or self.tp_size == 1:
            return None
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.tp_size
        dist.all_gather_object(gathered, sampled, group=self._group.cpu_group)
        return [rank for rank, tokens in enumerate(gathered) if tokens != gathered[0]]


class InertHub:
    """What a proposer on a TP rank other than 0 calls in place of a hub: nothing happens there
    (its drafts never reach the scheduler; its q̃ rows come from rank 0)."""

    endpoint = ""

    def start_request(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def in_flight(self, request_ids: Iterable[str]) -> dict[str, float | None]:
        return {}

    def collect(self, request_ids: Iterable[str], deadline_s: float, *args: Any,
                **kwargs: Any) -> dict[str, Any]:
        return {}

    def commit(self, *args: Any, **kwargs: Any) -> None:
        return None

    end_request = broadcast_status = count = count_many = close = commit


def omp_threads_bind(local_workers: int, cpus: Iterable[int], numa_nodes: int) -> str | None:
    """A ``VLLM_CPU_OMP_THREADS_BIND`` value for `local_workers` CPU workers on one machine, or
    None when vLLM's "auto" binding works (one NUMA node per worker at least). The allowed CPUs
    are split into contiguous groups, one per worker ("0|1" for 2 workers on 2 CPUs); with more
    workers than CPUs, workers share CPUs."""
    cpus = sorted(cpus)
    if local_workers <= 1 or numa_nodes >= local_workers or not cpus:
        return None
    if local_workers >= len(cpus):
        groups = [[cpus[i % len(cpus)]] for i in range(local_workers)]
    else:
        per, extra = divmod(len(cpus), local_workers)
        groups, start = [], 0
        for i in range(local_workers):
            size = per + (1 if i < extra else 0)
            groups.append(cpus[start:start + size])
            start += size
    return "|".join(",".join(str(c) for c in group) for group in groups)


def numa_node_count() -> int:
    nodes = [p for p in Path("/sys/devices/system/node").glob("node*")
             if re.fullmatch(r"node\d+", p.name)]
    return max(1, len(nodes))
