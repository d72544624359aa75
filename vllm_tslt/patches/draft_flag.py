"""One shared byte: did the last ``propose()`` leave drafts (or parks) for the scheduler?

`EngineCore.post_step` asks the workers for their draft token ids after every step, a cross-process
round trip (~0.8 ms on a 2-core CPU box; vllm_tslt.patches.engine). Whether that answer can be
non-empty is known in the worker that owns the hub the moment ``propose()`` returns: no request
was handed a draft and none is to be parked. The worker writes that here; the engine core reads it
in ``post_step`` and skips the round trip when it says "none". Skipping is exactly what taking an
empty answer does (the scheduler clears a request's drafts when it schedules them, so nothing
stale is left to verify), so requests whose device is paused or late run at plain vLLM's cost.
The byte is reset to UNKNOWN when a step begins, so a step whose ``propose()`` does not run (vLLM
skips the drafter near max_model_len) takes the drafts as before.

The byte lives in a file in /dev/shm (the temp dir elsewhere) named by a key that vLLM's executor
creates in the engine core process, before it starts the workers (a wrapper of
``Executor.__init__``: it runs there whether the engine core was forked or spawned, and in an
in-process engine too); the key (pid + 64 random bits) reaches the workers through
``VLLM_TSLT_ENGINE_CORE``, which they inherit. A fresh key per executor means no two servers share a
byte, even across PID namespaces sharing /dev/shm; the writer creates the file exclusively (0600)
and the reader only trusts a file of its own user, so nobody can plant a "no drafts" byte.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import mmap
import os
import secrets
import stat
import tempfile
from pathlib import Path

from .patch import Patch

logger = logging.getLogger(__name__)

ENV = "VLLM_TSLT_ENGINE_CORE"
UNKNOWN, NO_DRAFTS, DRAFTS = b"\x00", b"\x01", b"\x02"


def new_key() -> str:
    """A key for this engine's flag, set for the workers it is about to start."""
    key = f"{os.getpid()}-{secrets.token_hex(8)}"
    os.environ[ENV] = key
    return key


def _wrap_executor_init(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        if (getattr(vllm_config, "additional_config", None) or {}).get("tslt"):
            new_key()  # before _init_executor() starts the workers
        return original(self, vllm_config, *args, **kwargs)

    return __init__


PATCH = Patch("vllm.v1.executor.abstract:Executor", "__init__", "0.32.0", _wrap_executor_init)


def apply() -> bool:
    if PATCH.applied:
        return False
    PATCH.apply()
    return True


def flag_path(key: str) -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"vllm-tslt-drafts-{key}"


class DraftFlagWriter:
    """The hub owner's side (TsltProposer): ``set(any_drafts)`` after every ``propose()``."""

    def __init__(self, key: str | None = None) -> None:
        key = key if key is not None else os.environ.get(ENV)
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._last: bytes | None = None
        if not key:
            return
        self._path = flag_path(key)
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.pwrite(self._fd, UNKNOWN, 0)
            # Mapped: a write is a store, not a system call (a syscall on a core shared with
            # the engine core lets the scheduler switch process; measured with py-spy).
            self._map = mmap.mmap(self._fd, 1)
            self._last = UNKNOWN
            atexit.register(self.close)
        except (OSError, ValueError) as e:  # the engine then takes every step's drafts (the
            logger.warning("TSLT: cannot share the draft flag (%s); no step skips the draft "
                           "round trip", e)  # old behaviour): never "no drafts" by mistake
            self.close()

    def set(self, drafts: bool) -> None:
        """After propose(): whether it handed out any draft or park."""
        self._write(DRAFTS if drafts else NO_DRAFTS)

    def step_begins(self) -> None:
        """A step begins: until its propose() says otherwise, drafts may come."""
        self._write(UNKNOWN)

    def _write(self, value: bytes) -> None:
        if self._map is not None and value != self._last:
            self._map[0:1] = value
            self._last = value

    def close(self) -> None:
        """Close and remove the file (at exit too; a killed worker leaves one byte behind)."""
        if self._fd is not None:
            if self._map is not None:
                self._map.close()
                self._map = None
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                self._path.unlink()


class DraftFlagReader:
    """The engine core's side: ``no_drafts()`` is True only when the writer said so."""

    def __init__(self, key: str | None = None) -> None:
        self._key: str | None = key if key is not None else os.environ.get(ENV)
        self._map: mmap.mmap | None = None  # the writer's byte, mapped read-only

    def no_drafts(self) -> bool:
        if self._map is None:
            if not self._key:
                return False
            try:  # the worker creates the file when its proposer starts
                fd = os.open(flag_path(self._key), os.O_RDONLY)
            except OSError:
                return False
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                os.close(fd)  # not our worker's file: never trust it (and stop looking)
                logger.warning("TSLT: %s is not this user's private file; no step skips the "
                               "draft round trip", flag_path(self._key))
                self._key = None
                return False
            try:  # a read of the map is a load, not a system call (see DraftFlagWriter)
                self._map = mmap.mmap(fd, 1, prot=mmap.PROT_READ)
            except (OSError, ValueError):  # e.g. an empty file: the writer is not ready yet
                return False
            finally:
                os.close(fd)  # the map keeps the file
            with contextlib.suppress(OSError):  # both ends hold it now: leave no file behind
                flag_path(self._key).unlink()  # (a killed worker never runs its atexit)
        return self._map[0:1] == NO_DRAFTS
