"""Triton import shim: the torch paths of this package must work where Triton is absent.

The device agent installs torch without Triton, and importing a kernel module there must not fail.
When Triton is missing, `triton.jit` becomes a decorator that returns an object whose launch
raises a clear error; `HAS_TRITON` tells callers which case they are in. Nothing here touches
`sys.modules` (vLLM's CPU build has its own placeholder; we never install ours globally).
"""

from __future__ import annotations

import os
import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

    class _MissingTritonKernel:
        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise RuntimeError(
                f"Triton is not installed, so kernel {self.__name__} cannot run; "
                "use the torch path (backend='torch') or install triton."
            )

    def _jit(fn=None, **_kwargs):
        if fn is None:
            return _MissingTritonKernel
        return _MissingTritonKernel(fn)

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, (n - 1).bit_length()))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


__all__ = ["HAS_TRITON", "interpreter_enabled", "next_power_of_2", "tl", "triton"]
