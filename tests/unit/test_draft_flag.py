"""The shared draft flag (vllm_tslt/patches/draft_flag.py): the engine core skips its draft round
trip only when the hub's worker said, after its last propose(), that it handed out nothing."""

from __future__ import annotations

import os
from types import SimpleNamespace

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
    assert not draft_flag.flag_path(key).exists()  # open at both ends: the name is gone
    writer.set(False)
    writer.set(False)  # unchanged values are not rewritten
    assert reader.no_drafts()
    writer.close()


def test_a_step_without_propose_takes_the_drafts(key):
    """vLLM skips the drafter near max_model_len: the byte must not describe the step before."""
    writer, reader = DraftFlagWriter(key), DraftFlagReader(key)
    writer.set(False)
    assert reader.no_drafts()
    writer.step_begins()
    assert not reader.no_drafts()
    writer.close()


def test_the_writer_in_another_process_is_seen_through_the_mapping(key):
    """The engine core and the worker are separate processes: the shared mapping must carry every
    change the writer makes after the reader mapped it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    go, done = ctx.Event(), ctx.Event()

    def worker() -> None:
        writer = DraftFlagWriter(key)
        writer.set(False)
        done.set()
        go.wait(10)
        writer.set(True)
        done.set()
        go.wait(10)

    proc = ctx.Process(target=worker)
    proc.start()
    try:
        assert done.wait(10)
        reader = DraftFlagReader(key)
        assert reader.no_drafts()
        done.clear()
        go.set()
        assert done.wait(10)
        assert not reader.no_drafts()
    finally:
        go.set()
        proc.join(10)


def test_a_file_not_yet_written_is_read_as_unknown_and_mapped_later(key):
    path = draft_flag.flag_path(key)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # the writer, mid-creation
    try:
        reader = DraftFlagReader(key)
        assert not reader.no_drafts()  # empty: not mappable yet, take the drafts
        os.pwrite(fd, draft_flag.NO_DRAFTS, 0)
        assert reader.no_drafts()
    finally:
        os.close(fd)


def test_a_planted_file_is_never_trusted(key):
    path = draft_flag.flag_path(key)
    path.write_bytes(draft_flag.NO_DRAFTS)  # someone else's byte, before our worker starts
    path.chmod(0o644)
    writer = DraftFlagWriter(key)  # exclusive create fails: the writer stays off
    writer.set(False)
    assert path.read_bytes() == draft_flag.NO_DRAFTS
    path.chmod(0o666)
    assert not DraftFlagReader(key).no_drafts()  # writable by others: not ours
    path.unlink()


def test_without_a_key_nothing_is_shared(monkeypatch):
    monkeypatch.delenv(draft_flag.ENV, raising=False)
    writer = DraftFlagWriter()
    writer.set(False)  # no file: a no-op
    assert not DraftFlagReader().no_drafts()


def test_the_executor_names_a_fresh_key_for_tslt_engines(monkeypatch):
    monkeypatch.delenv(draft_flag.ENV, raising=False)
    seen = []
    init = draft_flag._wrap_executor_init(lambda self, cfg: seen.append(os.environ.get(
        draft_flag.ENV)))
    init(None, SimpleNamespace(additional_config={}))  # not a tslt engine: nothing set
    init(None, SimpleNamespace(additional_config={"tslt": {"bind": "tcp://127.0.0.1:0"}}))
    init(None, SimpleNamespace(additional_config={"tslt": {"bind": "tcp://127.0.0.1:0"}}))
    assert seen[0] is None
    assert seen[1] != seen[2] and all(k.startswith(f"{os.getpid()}-") for k in seen[1:])
