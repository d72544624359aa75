"""One shared byte: did the last ``propose()`` leave drafts (or parks) for the scheduler?

`EngineCore.post_step` asks the workers for their draft token ids after every step, a cross-process
round trip (~0.8 ms on a 2-core CPU box; vllm_tslt.patches.engine). Whether that answer can be
non-empty is known in the worker that owns the hub the moment ``propose()`` returns: no request
was handed a draft and none is to be parked. The worker writes that here; the engine core reads it
in ``post_step`` and skips the round trip when it says "none". Skipping is exactly what taking an
empty answer does (the scheduler clears a request's drafts when it schedules them, so nothing
stale is left to verify), so requests whose device is paused or late run at plain vLLM's cost.

The byte lives in a file in /dev/shm (the temp dir elsewhere) named by the engine core's pid: the
engine core sets ``VLLM_TSLT_ENGINE_CORE`` when vLLM loads plugins in it (vLLM names the process
``EngineCore`` or ``EngineCore_DP<rank>``), and the worker processes it starts inherit it (the
uniproc executor's worker runs in the same process). Where it is not set (an in-process engine),
nothing is written or read and every step takes the drafts as before. The writer starts the file
at UNKNOWN, so a file left by an earlier engine with a reused pid never skips a step.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

ENV = "VLLM_TSLT_ENGINE_CORE"
ENGINE_PROCESS_PREFIX = "EngineCore"  # vllm.v1.engine.utils names its engine core processes so
UNKNOWN, NO_DRAFTS, DRAFTS = b"\x00", b"\x01", b"\x02"


def mark_engine_core_process() -> None:
    """In vLLM's engine core process, name it for the workers it is about to start (plugin load)."""
    if multiprocessing.current_process().name.startswith(ENGINE_PROCESS_PREFIX):
        os.environ[ENV] = str(os.getpid())


def flag_path(key: str) -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"vllm-tslt-drafts-{key}"


class DraftFlagWriter:
    """The hub owner's side (TsltProposer): ``set(any_drafts)`` after every ``propose()``."""

    def __init__(self, key: str | None = None) -> None:
        key = key if key is not None else os.environ.get(ENV)
        self._fd: int | None = None
        self._last: bytes | None = None
        if not key:
            return
        self._path = flag_path(key)
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._fd, UNKNOWN, 0)
            atexit.register(self.close)
        except OSError as e:  # the engine then takes every step's drafts (the old behaviour)
            logger.warning("TSLT: cannot share the draft flag (%s); no step skips the draft "
                           "round trip", e)
            self._fd = None

    def set(self, drafts: bool) -> None:
        value = DRAFTS if drafts else NO_DRAFTS
        if self._fd is not None and value != self._last:
            os.pwrite(self._fd, value, 0)
            self._last = value

    def close(self) -> None:
        """Close and remove the file (at exit too; a killed worker leaves one byte behind)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                self._path.unlink()


class DraftFlagReader:
    """The engine core's side: ``no_drafts()`` is True only when the writer said so."""

    def __init__(self, key: str | None = None) -> None:
        self._key = key if key is not None else os.environ.get(ENV)
        self._fd: int | None = None

    def no_drafts(self) -> bool:
        if self._fd is None:
            if not self._key:
                return False
            try:  # the worker creates the file when its proposer starts
                self._fd = os.open(flag_path(self._key), os.O_RDONLY)
            except OSError:
                return False
        return os.pread(self._fd, 1, 0) == NO_DRAFTS
