"""Fixtures every end-to-end module shares; each module defines its own `edge` (its server)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def client(edge):
    """The official `openai` client on the module's server."""
    from openai import OpenAI

    return OpenAI(base_url=edge["url"] + "/v1", api_key="unused", timeout=300)


@pytest.fixture(scope="module")
def reference(tiny_reference):
    """(tokenizer, target) in transformers: the exact reference (tests/conftest.py)."""
    return tiny_reference
