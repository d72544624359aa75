"""Exact target probabilities of short continuations and the chi-square test against them: the
statistical end-to-end tests' reference (transformers, float64 softmax)."""

from __future__ import annotations

import torch
from scipy.stats import chisquare


def continuation_cells(reference, prompt: str, length: int, floor: float = 2e-3):
    """Exact target probabilities of every `length`-token continuation with p >= floor."""
    tok, model = reference
    base = tok(prompt).input_ids
    cells: dict[tuple[int, ...], float] = {}
    frontier = [((), 1.0)]
    with torch.no_grad():
        for _ in range(length):
            nxt = []
            for seq, p in frontier:
                logits = model(input_ids=torch.tensor([base + list(seq)])).logits[0, -1]
                probs = torch.softmax(logits.double(), -1)
                for t in torch.nonzero(probs * p >= floor).flatten().tolist():
                    nxt.append(((*seq, t), p * float(probs[t])))
            frontier = nxt
    for seq, p in frontier:
        cells[seq] = p
    return cells


def chi_square_p(samples: list[tuple[int, ...]], cells: dict[tuple[int, ...], float]) -> float:
    n = len(samples)
    keys = [k for k, p in cells.items() if p * n >= 5]
    observed = [sum(s == k for s in samples) for k in keys]
    expected = [cells[k] * n for k in keys]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    return float(chisquare(observed, expected).pvalue)
