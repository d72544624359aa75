"""Training loops: the target by next-token cross-entropy, the draft by distillation on the target.

Everything random (initialisation, batch windows) comes from seeded generators, so a build is
deterministic for a seed and a thread count on one machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .recipes import ModelShape, PairRecipe, TrainSchedule
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


def llama_config(shape: ModelShape, recipe: PairRecipe):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


def new_model(shape: ModelShape, recipe: PairRecipe, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape, recipe))
    model.config.use_cache = False
    return model


def _lr_at(step: int, sched: TrainSchedule) -> float:
    if step < sched.warmup_steps:
        return sched.lr * (step + 1) / sched.warmup_steps
    progress = (step - sched.warmup_steps) / max(1, sched.steps - sched.warmup_steps)
    return sched.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_windows(stream: torch.Tensor, batch_size: int, seq_len: int,
                   gen: torch.Generator) -> torch.Tensor:
    # stream: [num_tokens] int64 -> [batch_size, seq_len] windows at random offsets
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def _optimizer(model, lr: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), foreach=False,
    )


def _run_steps(model, sched: TrainSchedule, loss_fn, desc: str) -> list[float]:
    opt = _optimizer(model, sched.lr)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(sched.steps), desc=desc, unit="step", mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, sched)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
    model.eval()
    return losses


def train_target(model, stream: torch.Tensor, recipe: PairRecipe) -> list[float]:
    sched = recipe.target_train
    gen = torch.Generator().manual_seed(recipe.seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        batch = sample_windows(stream, sched.batch_size, recipe.seq_len + 1, gen)
        logits = model(input_ids=batch[:, :-1]).logits  # [batch, seq_len, vocab_size]
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    return _run_steps(model, sched, loss_fn, f"{recipe.name}: train target")


def distill_draft(draft, target, stream: torch.Tensor, recipe: PairRecipe) -> list[float]:
    """Minimise KL(p_target || q_draft) per position at temperature 1 (target's final scale)."""
    sched = recipe.draft_train
    gen = torch.Generator().manual_seed(recipe.seed + 2)

    def loss_fn(step: int) -> torch.Tensor:
        batch = sample_windows(stream, sched.batch_size, recipe.seq_len, gen)
        with torch.no_grad():
            log_p = F.log_softmax(target(input_ids=batch).logits, dim=-1)
        log_q = F.log_softmax(draft(input_ids=batch).logits, dim=-1)
        return F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True,
                        reduction="batchmean")

    return _run_steps(draft, sched, loss_fn, f"{recipe.name}: distill draft")


@torch.no_grad()
def final_logits(model, windows: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    # windows: [num_windows, seq_len] -> logits [num_windows * seq_len, vocab_size] float32
    return torch.cat([model(input_ids=windows[i:i + chunk]).logits.flatten(0, 1)
                      for i in range(0, windows.shape[0], chunk)])


def mean_entropy(logits: torch.Tensor) -> float:
    logp = F.log_softmax(logits, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def calibrate_logit_scale(logits: torch.Tensor, target_entropy: float | None) -> float:
    """Smallest-error scale s with mean entropy(softmax(s * logits)) == target_entropy (bisection).

    Returns 1.0 when no target is set or the raw network is already at least that concentrated.
    """
    if target_entropy is None or mean_entropy(logits) <= target_entropy:
        return 1.0
    lo, hi = 1.0, 16.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if mean_entropy(logits * mid) > target_entropy:
            lo = mid
        else:
            hi = mid
    return round(hi, 4)
