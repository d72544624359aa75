"""The shared draft flag (vllm_tslt/patches/draft_flag.py): the engine core skips its draft round
trip only when the hub's worker said, after its last propose(), that it handed out nothing."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from vllm_tslt.patches import draft_flag
from vllm_tslt.patches.draft_flag import DraftFlagReader, DraftFlagWriter

pytestmark = pytest.mark.unit


@pytest.fixture
def key(tmp_path, monkeypatch):
    monkeypatch.setattr(draft_flag, "flag_path", lambda k: tmp_path / f"flag-{k}")
    return "1234"


def test_reader_skips_only_after_the_writer_says_none(key):
    reader = DraftFlagReader(key)
    assert not reader.no_drafts()  # no writer yet: take the drafts
    writer = DraftFlagWriter(key)
    assert not reader.no_drafts()  # started: unknown
    writer.set(False)
    assert reader.no_drafts()
    writer.set(True)
    assert not reader.no_drafts()
    writer.set(False)
    writer.set(False)  # unchanged values are not rewritten
    assert reader.no_drafts()
    writer.close()
    assert not draft_flag.flag_path(key).exists()


def test_a_new_writer_forgets_a_stale_file(key):
    draft_flag.flag_path(key).write_bytes(draft_flag.NO_DRAFTS)  # an earlier engine, same pid
    writer = DraftFlagWriter(key)
    assert not DraftFlagReader(key).no_drafts()
    writer.close()


def test_without_a_key_nothing_is_shared(monkeypatch):
    monkeypatch.delenv(draft_flag.ENV, raising=False)
    writer = DraftFlagWriter()
    writer.set(False)  # no file: a no-op
    assert not DraftFlagReader().no_drafts()


def test_only_the_engine_core_process_names_itself(monkeypatch):
    monkeypatch.delenv(draft_flag.ENV, raising=False)
    draft_flag.mark_engine_core_process()  # pytest's process is no engine core
    assert draft_flag.ENV not in os.environ
    monkeypatch.setattr(multiprocessing.current_process(), "name", "EngineCore_DP1")
    draft_flag.mark_engine_core_process()
    assert os.environ[draft_flag.ENV] == str(os.getpid())
