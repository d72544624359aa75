"""Shared fixtures. Tiers are pytest markers (see pyproject.toml): run one with `-m unit` etc."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # The tests' own tensors are small: one torch thread is much faster than two when anything else
    # (a vLLM engine in a child process, another job) shares the 2 cores. Children are unaffected.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def compiled_draft_decoder():
    """Compile the numba draft codec once, before any test starts a hub or an agent. Both start
    compiling it in a background thread (seconds without numba's cache), which would compete with
    the timing-dependent tests (late-draft decisions of the intake) for the CPU and the GIL."""
    from vllm_tslt.protocol.sparse_payload import compile_codec

    compile_codec()


@pytest.fixture(scope="session")
def tiny_pair():
    """The built-in `tiny` pair (built once per machine, ~1-2 minutes, then cached)."""
    from vllm_tslt.models.pairs import ensure_pair

    return ensure_pair("tiny")


@pytest.fixture(scope="session")
def tiny_reference(tiny_pair):
    """(tokenizer, target model) of the tiny pair in transformers, float32: the exact reference
    the end-to-end tests compare vLLM's output with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pair.target))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair.target), dtype=torch.float32)
    return tok, model.eval()
