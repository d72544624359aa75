"""vLLM's CPU kernel overrides for tests that call vLLM's samplers in the test process."""

from __future__ import annotations

import sys

# Modules whose attributes vLLM 0.32's scan of sys.modules (triton_utils.dispatcher._rebind_kernels)
# cannot read: llvmlite's `ffi.lib` answers every attribute, `__dict__` included, with a function
# wrapper, and the scan calls `.get` on it. llvmlite is loaded once numba compiles something, e.g.
# the edge's compiled draft decoder (vllm_tslt.protocol.compiled) in an earlier test.
UNSCANNABLE = ("llvmlite.binding.ffi",)


def register_cpu_kernel_overrides() -> None:
    """``current_platform.register_triton_kernel_overrides()``, what every vLLM CPU worker runs at
    start (before anything loads numba), with the unscannable modules out of sys.modules for the
    duration of the scan. Modules that imported them keep their references; nothing is reloaded."""
    from vllm.platforms import current_platform

    hidden = {name: sys.modules.pop(name) for name in UNSCANNABLE if name in sys.modules}
    try:
        current_platform.register_triton_kernel_overrides()
    finally:
        sys.modules.update(hidden)
