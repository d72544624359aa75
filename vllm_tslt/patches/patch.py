"""A tiny helper that replaces one attribute of a vLLM module or class, once, keeping the original.

`Patch("vllm.engine.arg_utils:EngineArgs", "create_speculative_config", "0.32.0", wrap)` resolves
the owner (a module, or `module:Class`), passes the original attribute to `wrap` and installs what
it returns. A second `apply()` raises instead of wrapping twice; `revert()` restores the original.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class PatchError(RuntimeError):
    pass


@dataclass
class Patch:
    owner: str  # "package.module" or "package.module:Class"
    attr: str
    version: str  # the vLLM version this patch was written against
    make_replacement: Callable[[Any], Any]  # original -> replacement
    original: Any = field(default=None, init=False)
    applied: bool = field(default=False, init=False)

    @property
    def target(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.attr}"

    def resolve_owner(self) -> Any:
        module_name, _, class_name = self.owner.partition(":")
        try:
            obj = importlib.import_module(module_name)
            return getattr(obj, class_name) if class_name else obj
        except (ImportError, AttributeError) as exc:
            raise PatchError(f"vLLM {self.version} symbol {self.target} not found ({exc}): this "
                             "vLLM is not the one vllm-tslt was written for") from exc

    def resolve(self) -> Any:
        owner = self.resolve_owner()
        if not hasattr(owner, self.attr):
            raise PatchError(f"vLLM {self.version} symbol {self.target} not found: this vLLM is "
                             "not the one vllm-tslt was written for")
        return getattr(owner, self.attr)

    def apply(self) -> None:
        current = self.resolve()
        if self.applied or getattr(current, "__tslt_patch__", None):
            raise PatchError(f"{self.target} is already patched")
        replacement = self.make_replacement(current)
        replacement.__tslt_patch__ = self.target
        self.original = current
        setattr(self.resolve_owner(), self.attr, replacement)
        self.applied = True
        logger.debug("vllm-tslt patched %s", self.target)

    def revert(self) -> None:
        if self.applied:
            setattr(self.resolve_owner(), self.attr, self.original)
            self.applied = False
