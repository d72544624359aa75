"""Held-out measurements of a pair: loss, concentration, and draft/target agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .recipes import ModelShape, PairRecipe


def flops_per_token(shape: ModelShape, vocab_size: int, context: int) -> int:
    """Forward matmul FLOPs for one token at a given context length (2 per multiply-add).

    Projections q,k,v,o (4 d^2), SwiGLU MLP (3 d f), lm_head (d V), attention scores and
    weighted sum (2 d context) per layer; embeddings and norms are not counted.
    """
    d, f = shape.hidden_size, shape.intermediate_size
    per_layer = 4 * d * d + 3 * d * f + 2 * d * context
    return 2 * (shape.num_layers * per_layer + d * vocab_size)


def nucleus_sizes(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # probs: [num_tokens, vocab_size] -> [num_tokens] smallest k with top-k mass >= top_p
    cum = probs.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return (cum < top_p).sum(dim=-1) + 1


@torch.no_grad()
def pair_stats(target, draft, windows: torch.Tensor, recipe: PairRecipe, logit_scale: float,
               chunk: int = 4) -> dict:
    """`target` already includes the logit scale; `windows` [num_windows, seq_len + 1] held-out."""
    sums = {"loss_scaled": 0.0, "loss_raw": 0.0, "draft_loss": 0.0, "entropy": 0.0, "alpha": 0.0}
    nuclei, count = [], 0
    for i in range(0, windows.shape[0], chunk):
        batch = windows[i:i + chunk]
        inputs, labels = batch[:, :-1], batch[:, 1:].flatten()
        z = target(input_ids=inputs).logits.flatten(0, 1).float()  # [num_tokens, vocab_size]
        zq = draft(input_ids=inputs).logits.flatten(0, 1).float()
        logp, logq = F.log_softmax(z, -1), F.log_softmax(zq, -1)
        p = logp.exp()
        sums["loss_scaled"] += float(F.nll_loss(logp, labels, reduction="sum"))
        sums["loss_raw"] += float(F.cross_entropy(z / logit_scale, labels, reduction="sum"))
        sums["draft_loss"] += float(F.nll_loss(logq, labels, reduction="sum"))
        sums["entropy"] += float(-(p * logp).sum())
        sums["alpha"] += float(torch.minimum(p, logq.exp()).sum())
        nuclei.append(nucleus_sizes(p, 0.95))
        count += labels.numel()
    nucleus = torch.cat(nuclei).float()
    t_params = sum(p.numel() for p in target.parameters())
    d_params = sum(p.numel() for p in draft.parameters())
    flops_t = flops_per_token(recipe.target, recipe.vocab_size, recipe.seq_len)
    flops_d = flops_per_token(recipe.draft, recipe.vocab_size, recipe.seq_len)
    return {
        "heldout_positions": count,
        "target_params": t_params,
        "draft_params": d_params,
        "target_flops_per_token": flops_t,
        "draft_flops_per_token": flops_d,
        "flops_ratio": round(flops_t / flops_d, 2),
        "logit_scale": logit_scale,
        "target_heldout_loss_raw": round(sums["loss_raw"] / count, 4),
        "target_heldout_loss": round(sums["loss_scaled"] / count, 4),
        "draft_heldout_loss": round(sums["draft_loss"] / count, 4),
        "target_mean_entropy": round(sums["entropy"] / count, 4),
        "target_median_nucleus_p95": int(nucleus.median()),
        "target_mean_nucleus_p95": round(float(nucleus.mean()), 2),
        "alpha": round(sums["alpha"] / count, 4),
    }


def stats_table(stats: dict) -> str:
    """The stats.json of a built pair as an aligned two-column table (build-models, demo)."""
    rows = [
        ("parameters (target / draft)", f"{stats['target_params']:,} / {stats['draft_params']:,}"),
        ("FLOPs per token, target / draft", f"{stats['flops_ratio']}x"),
        ("vocabulary", f"{stats['vocab_size']}"),
        ("target logit scale s (temperature 1/s)", f"{stats['logit_scale']}"),
        ("target held-out loss, raw / at scale s",
         f"{stats['target_heldout_loss_raw']} / {stats['target_heldout_loss']} nats"),
        ("target mean entropy", f"{stats['target_mean_entropy']} nats"),
        ("target median top-p=0.95 nucleus", f"{stats['target_median_nucleus_p95']} tokens"),
        ("draft/target agreement alpha", f"{stats['alpha']}"),
        ("build time", f"{stats['build_seconds']['total_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
