"""The built-in model pairs: determinism, tokenizer, transformers and vLLM loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_tslt.models.pairs import build_pair, weights_hash
from vllm_tslt.models.recipes import TINY, TrainSchedule

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Same code path as `tiny`, fewer steps, so two builds fit in a test.
MICRO = dataclasses.replace(
    TINY,
    name="micro",
    target_train=TrainSchedule(steps=12, batch_size=4, lr=3e-3, warmup_steps=2),
    draft_train=TrainSchedule(steps=8, batch_size=4, lr=3e-3, warmup_steps=2),
    corpus_max_bytes=400_000,
)


def _hashes(root):
    return (weights_hash(root / "target"), weights_hash(root / "draft"),
            (root / "target" / "tokenizer.json").read_bytes())


def test_build_is_deterministic_for_a_seed(tmp_path):
    build_pair(MICRO, tmp_path / "a")
    build_pair(MICRO, tmp_path / "b")
    build_pair(dataclasses.replace(MICRO, seed=1), tmp_path / "c")
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert a == b, "same recipe and seed gave different weights"
    assert a[0] != c[0] and a[1] != c[1], "a different seed gave the same weights"


def test_tiny_pair_is_concentrated_and_agrees(tiny_pair):
    stats = tiny_pair.stats()
    # The statistical tiers need a peaky target and a correlated draft (see recipes.TINY).
    assert stats["target_mean_entropy"] <= 1.5, stats
    assert stats["alpha"] >= 0.5, stats
    # Build time is recorded for the report (scripts/models_report.py), never asserted: a timed
    # test fails on a loaded machine or a shared cache without anything being wrong.
    assert stats["build_seconds"]["total_s"] > 0, stats


UNICODE_SAMPLES = [
    "plain ascii: def f(x): return x + 1\n",
    "naïve café — “quotes” ‘single’ …",
    "日本語のテキスト、中文文本、한국어 텍스트",
    "emoji 🐍🚀👩‍💻 and flags 🇫🇷",
    "combining: e\u0301 a\u0308, zero-width:\u200b|, rtl: שלום مرحبا",
    "\ttabs\tand\r\nwindows newlines\x00nul\x7f",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_unicode(tiny_pair, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pair.target))
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    with_bos = tok(text).input_ids
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids


def test_target_and_draft_share_the_tokenizer(tiny_pair):
    assert (tiny_pair.target / "tokenizer.json").read_bytes() == (
        tiny_pair.draft / "tokenizer.json").read_bytes()


def test_chat_template_renders(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pair.target))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "### user:\nhi\n### assistant:\n"


def test_checkpoints_generate_in_transformers(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pair.target))
    ids = tok("def main():\n", return_tensors="pt").input_ids
    for path in (tiny_pair.target, tiny_pair.draft):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        out = model.generate(ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.shape[1]
        assert model.config.vocab_size == len(tok)


def test_vllm_greedy_equals_transformers_greedy(tiny_pair, tmp_path):
    """One vllm.LLM engine (child process) generates; transformers' greedy decode must agree."""
    from vllm_tslt.demo import PROMPTS, transformers_greedy, vllm_generate

    *rows, summary = vllm_generate(tiny_pair.target, PROMPTS, 16, tmp_path / "vllm.log")
    assert summary["generated_tokens"] > 0
    reference = transformers_greedy(tiny_pair.target, PROMPTS, 16)
    for row, ref in zip(rows, reference, strict=True):
        assert row["token_ids"] == ref, (row["prompt"], row["text"])
