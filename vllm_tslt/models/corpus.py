"""The training text: the Python standard library's own sources, present on every machine.

Files are split by a hash of their relative path into train / calibration / held-out, so the split
is stable and independent of how many files a Python version ships. The same Python version gives the
same corpus; its fingerprint is part of every model's cache key.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Folders that are mostly tests, data tables or vendored code, not representative source.
_EXCLUDED_PARTS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "encodings",
    "pydoc_data", "__pycache__", "turtledemo", "ensurepip", "config-3", "tkinter",
})
SPLITS = ("train", "calib", "heldout")


def _split_of(rel_path: str) -> str:
    bucket = int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 20
    return "heldout" if bucket == 0 else "calib" if bucket == 1 else "train"


@dataclass(frozen=True)
class Corpus:
    files: tuple[tuple[str, str], ...]  # (relative path, text), sorted by path
    fingerprint: str

    def texts(self, split: str, max_bytes: int | None = None) -> list[str]:
        """The texts of one split, in path order, cut at `max_bytes` UTF-8 bytes in total."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        out, total = [], 0
        for rel, text in self.files:
            if _split_of(rel) != split:
                continue
            if max_bytes is not None and total >= max_bytes:
                break
            out.append(text)
            total += len(text.encode())
        return out


@lru_cache(maxsize=1)
def stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_PARTS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append((rel.as_posix(), text))
    digest = hashlib.sha256()
    digest.update(sys.version.split()[0].encode())
    for rel, text in files:
        digest.update(rel.encode())
        digest.update(hashlib.sha256(text.encode()).digest())
    return Corpus(files=tuple(files), fingerprint=digest.hexdigest()[:16])


def heldout_texts(pair_name: str | None = None, max_bytes: int = 400_000) -> list[str]:
    """Held-out source files (never trained or calibrated on). Same split for every pair."""
    del pair_name  # every pair shares the split; the argument keeps call sites explicit
    return stdlib_corpus().texts("heldout", max_bytes=max_bytes)
