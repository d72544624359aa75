"""Build, cache and locate the built-in draft/target pairs.

`ensure_pair("tiny")` returns the cached pair or builds it (progress bars on stderr). The cache
directory is `$VLLM_TSLT_HOME/models/<pair>-<key>`, where the key hashes the recipe, the corpus and
the builder version, so a changed recipe never reuses stale weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..envs import build_threads, tslt_home
from .corpus import stdlib_corpus
from .recipes import PairRecipe, get_recipe

logger = logging.getLogger(__name__)
_DONE = "stats.json"


@dataclass(frozen=True)
class PairPaths:
    name: str
    root: Path
    target: Path  # HF checkpoint dir (with the tokenizer)
    draft: Path  # HF checkpoint dir (with the same tokenizer)

    def stats(self) -> dict:
        return json.loads((self.root / _DONE).read_text())


def pair_dir(recipe: PairRecipe, home: Path | None = None) -> Path:
    home = home or tslt_home()
    return home / "models" / f"{recipe.name}-{recipe.key(stdlib_corpus().fingerprint)}"


def _paths(recipe: PairRecipe, root: Path) -> PairPaths:
    return PairPaths(recipe.name, root, root / "target", root / "draft")


def ensure_pair(name_or_recipe: str | PairRecipe, home: Path | None = None) -> PairPaths:
    """The pair's paths, building it first if it is not cached."""
    recipe = get_recipe(name_or_recipe) if isinstance(name_or_recipe, str) else name_or_recipe
    root = pair_dir(recipe, home)
    if (root / _DONE).exists():
        return _paths(recipe, root)
    _remove_dead_partials(root)
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    build_pair(recipe, partial)
    try:
        partial.rename(root)
    except OSError:  # another process finished the same build first; keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    return _paths(recipe, root)


def _remove_dead_partials(root: Path) -> None:
    """Delete half-built directories left by builds whose process no longer exists."""
    for partial in root.parent.glob(f"{root.name}.partial-*"):
        pid = int(partial.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass


def weights_hash(checkpoint_dir: Path) -> str:
    """sha256 over the tensors of a checkpoint (names, dtypes, shapes and bytes), sorted by name."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint_dir / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def build_pair(recipe: PairRecipe, out_dir: Path) -> dict:
    """Build tokenizer, target and draft into out_dir; returns (and writes) the stats."""
    import torch

    from . import train
    from .stats import pair_stats
    from .tokenizer import encode_corpus, save_hf_tokenizer, train_tokenizer

    torch.set_num_threads(build_threads())
    out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = stdlib_corpus()
    train_texts = corpus.texts("train", recipe.corpus_max_bytes)
    tok = train_tokenizer(train_texts, recipe.vocab_size)
    streams = {
        split: torch.tensor(encode_corpus(tok, texts), dtype=torch.long)
        for split, texts in (("train", train_texts),
                             ("calib", corpus.texts("calib", 300_000)),
                             ("heldout", corpus.texts("heldout", 400_000)))
    }
    times["tokenizer_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    target = train.new_model(recipe.target, recipe, seed=recipe.seed)
    target_losses = train.train_target(target, streams["train"], recipe)
    calib = _windows(streams["calib"], recipe.seq_len, 24)
    scale = train.calibrate_logit_scale(train.final_logits(target, calib), recipe.target_entropy)
    with torch.no_grad():
        target.lm_head.weight.mul_(scale)
    target.config.tslt_logit_scale = scale
    times["target_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    draft = train.new_model(recipe.draft, recipe, seed=recipe.seed + 100)
    draft_losses = train.distill_draft(draft, target, streams["train"], recipe)
    times["draft_s"] = time.perf_counter() - t2

    for model, sub in ((target, "target"), (draft, "draft")):
        model.config.use_cache = True
        model.save_pretrained(str(out_dir / sub), safe_serialization=True)
        save_hf_tokenizer(tok, out_dir / sub, recipe.max_position_embeddings)

    heldout = _windows(streams["heldout"], recipe.seq_len + 1, 48 if recipe.name == "base" else 32)
    stats = pair_stats(target, draft, heldout, recipe, scale)
    times["total_s"] = time.perf_counter() - t0
    stats.update({
        "pair": recipe.name, "vocab_size": recipe.vocab_size,
        "build_seconds": {k: round(v, 1) for k, v in times.items()},
        "build_threads": build_threads(),
        "train_tokens": int(streams["train"].numel()),
        "target_final_train_loss": round(sum(target_losses[-20:]) / 20, 4),
        "draft_final_kl": round(sum(draft_losses[-20:]) / 20, 4),
        "corpus_fingerprint": corpus.fingerprint,
        "recipe": asdict(recipe),
    })
    (out_dir / _DONE).write_text(json.dumps(stats, indent=2))
    logger.info("built pair %s in %.0f s into %s", recipe.name, times["total_s"], out_dir)
    return stats


def _windows(stream, length: int, count: int):
    # stream: [num_tokens] -> [min(count, available), length] non-overlapping windows
    n = min(count, stream.numel() // length)
    return stream[: n * length].view(n, length)
