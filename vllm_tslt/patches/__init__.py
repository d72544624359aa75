"""Every change vllm-tslt makes to vLLM 0.32.0, applied from one ordered list.

Each patch names the vLLM symbol it targets, wraps or replaces it without copying vLLM's body, and
has a contract test in tests/unit/test_vllm_contract.py. `apply_all()` is idempotent.
"""

from __future__ import annotations

from .patch import Patch, PatchError

__all__ = ["Patch", "PatchError", "apply_all"]


def apply_all() -> list[str]:
    """Apply every patch that the running process needs; returns the names applied now."""
    from . import (
        cpu_expand,
        draft_flag,
        engine,
        metrics,
        runner,
        scheduler,
        spec_config,
        structured,
    )

    applied = []
    for module in (cpu_expand, spec_config, runner, structured, scheduler, engine, draft_flag,
                   metrics):
        if module.apply():
            applied.append(module.__name__.rsplit(".", 1)[1])
    return applied
