"""Every environment variable vllm-tslt reads, in one place (STYLE habit 7)."""

from __future__ import annotations

import os
from pathlib import Path


def tslt_home() -> Path:
    """Root of vllm-tslt's caches (built models). `VLLM_TSLT_HOME`, default ~/.cache/vllm-tslt."""
    default = Path.home() / ".cache" / "vllm-tslt"
    return Path(os.environ.get("VLLM_TSLT_HOME", str(default))).expanduser()


def build_threads() -> int:
    """Torch threads used to build models. `VLLM_TSLT_BUILD_THREADS`, default: all cores.

    The same thread count gives bit-identical weights for the same seed on the same machine.
    """
    return int(os.environ.get("VLLM_TSLT_BUILD_THREADS", str(os.cpu_count() or 1)))


def test_switches_enabled() -> bool:
    """`VLLM_TSLT_TEST_SWITCHES=1` lets requests turn on test-only behaviour (negative controls
    that re-introduce known biases, e.g. `vllm_xargs.tslt_test_structured_cut`). Never set it on
    a production server."""
    return os.environ.get("VLLM_TSLT_TEST_SWITCHES", "") == "1"


def cpu_omp_threads_bind() -> str | None:
    """vLLM's own `VLLM_CPU_OMP_THREADS_BIND` (CPU build), None when unset: `vllm-tslt serve`
    then picks a working binding where vLLM's "auto" would fail (vllm_tslt.serve)."""
    return os.environ.get("VLLM_CPU_OMP_THREADS_BIND")


def launcher_pid() -> int | None:
    """`VLLM_TSLT_LAUNCHER_PID`: set by vllm_tslt.edge.launch on the servers it starts; such a
    server stops itself and its children when that process is gone. None when unset."""
    value = os.environ.get("VLLM_TSLT_LAUNCHER_PID", "")
    return int(value) if value.isdigit() else None


def overhead_patches_enabled() -> bool:
    """`VLLM_TSLT_OVERHEAD_PATCHES=0` turns off the patches that only save time for requests
    without drafts (patches/engine.py, the `_sample` shortcut in patches/runner.py), so a
    benchmark can show the edge with and without them side by side. Default: on."""
    return os.environ.get("VLLM_TSLT_OVERHEAD_PATCHES", "1") != "0"
