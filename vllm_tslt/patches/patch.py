"""A tiny helper that replaces one attribute of one vLLM module, once, keeping the original."""

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
    """Replace `module:attr` (vLLM `version`) with `replacement`. Refuses to patch twice."""

    module: str
    attr: str
    version: str
    replacement: Callable[..., Any]
    original: Any = field(default=None, init=False)
    applied: bool = field(default=False, init=False)

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attr}"

    def resolve(self) -> Any:
        mod = importlib.import_module(self.module)
        if not hasattr(mod, self.attr):
            raise PatchError(f"vLLM {self.version} symbol {self.target} not found: "
                             "this vLLM is not the one vllm-tslt was written for")
        return getattr(mod, self.attr)

    def apply(self) -> None:
        current = self.resolve()
        if self.applied or current is self.replacement:
            raise PatchError(f"{self.target} is already patched")
        self.original = current
        setattr(importlib.import_module(self.module), self.attr, self.replacement)
        self.applied = True
        logger.info("vllm-tslt patched %s", self.target)

    def revert(self) -> None:
        if not self.applied:
            return
        setattr(importlib.import_module(self.module), self.attr, self.original)
        self.applied = False
