"""Targets for the fake engine: next-token probabilities of a sequence, and greedy decoding.

``TableTarget`` is a synthetic model whose next-token distribution depends on the position (mod
`periods`) and the last token only, drawn once from a seeded random table: cheap, and its exact
continuation probabilities are known (statistical tests). ``perturbed`` makes a correlated draft
model from it. ``HFTarget`` wraps a transformers causal LM (full recompute; small models only).
"""

from __future__ import annotations

import torch


class TableTarget:
    """p(next | seq) = softmax(table[len(seq) % periods, seq[-1]])."""

    def __init__(self, vocab_size: int = 64, periods: int = 3, scale: float = 3.0,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(periods, vocab_size, vocab_size, generator=g) * scale
        self.table = torch.softmax(logits.double(), dim=-1)  # [periods, V, V] float64
        self.vocab_size = vocab_size
        self.periods = periods

    def perturbed(self, noise: float, seed: int) -> TableTarget:
        """A draft model for this target: its log-probabilities plus Gaussian noise of std `noise`."""
        g = torch.Generator().manual_seed(seed)
        logits = torch.log(self.table) + torch.randn(self.table.shape, generator=g,
                                                     dtype=torch.float64) * noise
        draft = TableTarget.__new__(TableTarget)
        draft.table = torch.softmax(logits, dim=-1)
        draft.vocab_size, draft.periods = self.vocab_size, self.periods
        return draft

    def next_probs(self, seq: list[int]) -> torch.Tensor:
        """[vocab_size] float64 exact next-token probabilities."""
        return self.table[len(seq) % self.periods, seq[-1]]

    def probs(self, seq: list[int], n: int) -> torch.Tensor:
        """[n, vocab_size] float32: next-token probabilities after each of the last n prefixes."""
        rows = [self.next_probs(seq[: len(seq) - n + 1 + i]) for i in range(n)]
        return torch.stack(rows).float()

    def continuation_probs(self, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
        """Exact probability of every `length`-token continuation (all V**length of them)."""
        cells: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(length):
            nxt: dict[tuple[int, ...], float] = {}
            for seq, p in cells.items():
                row = self.next_probs(prompt + list(seq))
                for t in range(self.vocab_size):
                    nxt[(*seq, t)] = p * float(row[t])
            cells = nxt
        return cells

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        seq = list(prompt)
        for _ in range(max_tokens):
            seq.append(int(self.next_probs(seq).argmax()))
        return seq[len(prompt):]


class HFTarget:
    """A transformers causal LM as the target (full recompute per call; small models only)."""

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)

    @torch.inference_mode()
    def probs(self, seq: list[int], n: int) -> torch.Tensor:
        logits = self.model(input_ids=torch.tensor([seq])).logits[0, -n:].float()
        return torch.softmax(logits, dim=-1)

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        seq = list(prompt)
        for _ in range(max_tokens):
            seq.append(int(self.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(prompt):]
