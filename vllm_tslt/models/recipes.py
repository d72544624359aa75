"""Recipes of the built-in model pairs. A recipe fully determines a build (with the corpus)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# Bump when the builder's code changes in a way that changes the weights.
BUILDER_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TrainSchedule:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 20


@dataclass(frozen=True)
class PairRecipe:
    """How one draft/target pair is built.

    `target_entropy`: the target's logit scale s is calibrated (on a calibration split, never the
    held-out split) so the mean next-token entropy of softmax(s * logits) equals this many nats, and
    s is baked into the target's lm_head. The target is therefore "the trained network at
    temperature 1/s"; s is recorded in the pair's stats.json and config.json. None keeps s = 1.
    """

    name: str
    vocab_size: int
    seq_len: int
    target: ModelShape
    draft: ModelShape
    target_train: TrainSchedule
    draft_train: TrainSchedule
    corpus_max_bytes: int
    target_entropy: float | None
    max_position_embeddings: int = 2048
    seed: int = 0

    def key(self, corpus_fingerprint: str) -> str:
        """Cache key: the recipe, the corpus and the builder version."""
        blob = json.dumps(
            {"recipe": dataclasses.asdict(self), "corpus": corpus_fingerprint,
             "builder": BUILDER_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


TINY = PairRecipe(
    name="tiny",
    vocab_size=1024,
    seq_len=128,
    target=ModelShape(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=344),
    draft=ModelShape(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=172),
    target_train=TrainSchedule(steps=500, batch_size=16, lr=3e-3),
    draft_train=TrainSchedule(steps=300, batch_size=16, lr=3e-3),
    corpus_max_bytes=3_000_000,
    target_entropy=1.0,
)

BASE = PairRecipe(
    name="base",
    vocab_size=4096,
    seq_len=256,
    target=ModelShape(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=688),
    draft=ModelShape(hidden_size=128, num_layers=1, num_heads=2, intermediate_size=256),
    target_train=TrainSchedule(steps=560, batch_size=16, lr=2e-3, warmup_steps=40),
    draft_train=TrainSchedule(steps=500, batch_size=16, lr=3e-3, warmup_steps=30),
    corpus_max_bytes=8_000_000,
    target_entropy=2.0,
)

RECIPES: dict[str, PairRecipe] = {r.name: r for r in (TINY, BASE)}


def get_recipe(name: str) -> PairRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown model pair {name!r}; choose --pair from {sorted(RECIPES)}") from None
