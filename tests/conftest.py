"""Shared fixtures. Tiers are pytest markers (see pyproject.toml): run one with `-m unit` etc."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pair():
    """The built-in `tiny` pair (built once per machine, ~1-2 minutes, then cached)."""
    from vllm_tslt.models.pairs import ensure_pair

    return ensure_pair("tiny")
