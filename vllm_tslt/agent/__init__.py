"""Device side: the draft agent. Installs and imports without vLLM (extra `device`).

Import-light: torch, transformers, zmq and aiohttp load only when the agent is built.
``Agent`` / ``AgentConfig`` / ``run_agent`` are re-exported lazily.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Agent": "vllm_tslt.agent.service",
    "run_agent": "vllm_tslt.agent.service",
    "AgentConfig": "vllm_tslt.agent.config",
    "DraftRuntime": "vllm_tslt.agent.runtime",
    "Drafter": "vllm_tslt.agent.drafter",
    "EdgeClient": "vllm_tslt.agent.client",
    "HandshakeRefused": "vllm_tslt.agent.client",
    "FrontServer": "vllm_tslt.agent.front",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
