"""Float-valued draft rows: the baselines' wire formats, verified exactly like TSLT's q̃.

TSLT sends integer masses (``SparseQ``). The schemes it is compared with send floats:

- ``dsd-fp32`` / ``dsd-fp16`` (distributed speculative decoding): the whole draft distribution, one
  value per vocabulary entry;
- ``tkslt`` (TK-SLT, arXiv 2509.04576): the top-K probabilities as fp16 plus their indices.

To keep these lossless too (DESIGN.md rule 1), both sides compute the draft distribution from the
*transmitted values* with one shared formula, ``normalise_rows``: v / Σv in float64, quantised to
integer multiples of 2**-24 by the largest-remainder rule so that every row sums to exactly 1.
Every such q̂ is exact in float32 (an integer up to 2**24 times a power of two), so the device's
sampler (``sample_from_float``, float64 inverse CDF over the same numbers) and the edge's verifier
(float32) use bit-identical probabilities, never the unrounded softmax. Quantising costs at most
2**-24 per entry (a token with v / Σv below that may get q̂ = 0; it is then never drafted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_tslt.core.sparsify import (
    PAD_ID,
    SparseQ,
    SparsifyConfig,
    scatter_rows,
    stack_rows,
    values_at,
)

# Wire formats a device may use for its drafts. "tslt" is the product; the rest are baselines.
WIRE_FORMATS = ("tslt", "dsd-fp32", "dsd-fp16", "tkslt")
FLOAT_WIRE_FORMATS = WIRE_FORMATS[1:]


MASS_BITS = 24  # q̂ is a multiple of 2**-MASS_BITS: exact in float32 and float64


def normalise_rows(values: torch.Tensor) -> torch.Tensor:
    """The shared formula: [n, k] non-negative values -> q̂ [n, k] float32, each row summing to
    exactly 1 (integer masses c / 2**24, largest remainders rounded up, ties to the lower column).
    A row with no mass stays all zero (decoding refuses it)."""
    v = values.to(torch.float64)
    unit = float(1 << MASS_BITS)
    total = v.sum(dim=1, keepdim=True)
    scaled = torch.where(total > 0, v / total.clamp_min(1e-300) * unit, 0.0)  # [n, k]
    counts = scaled.floor()
    short = (torch.where(total[:, 0] > 0, unit, 0.0) - counts.sum(dim=1)).clamp_min(0)  # [n]
    # NOTE: the `short` (< k) units go to the largest remainders; a stable sort makes ties fall
    # to the lower column on every machine.
    order = torch.sort(scaled - counts, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(
        order.shape[1]).expand_as(order).contiguous())
    counts = counts + (rank < short.unsqueeze(1)).to(torch.float64)
    excess = (counts.sum(dim=1) - torch.where(total[:, 0] > 0, unit, 0.0)).clamp_min(0)
    if bool((excess > 0).any()):  # float64 rounding put a row over 2**24: take it off its largest
        top = counts.argmax(dim=1, keepdim=True)
        counts.scatter_add_(1, top, -excess.unsqueeze(1))
    return (counts / unit).to(torch.float32)


@dataclass(frozen=True)
class FloatQ:
    """Draft rows as transmitted float values (see the module doc). Same row interface as SparseQ.

    ``indices`` [n, k] int32 ascending, PAD_ID-padded at the end; ``values`` [n, k] float32 exactly
    as on the wire (0 at padding; not normalised). ``wire`` names the format that carries them.
    """

    indices: torch.Tensor
    values: torch.Tensor
    wire: str

    def __post_init__(self) -> None:
        if self.wire not in FLOAT_WIRE_FORMATS:
            raise ValueError(f"FloatQ.wire must be one of {FLOAT_WIRE_FORMATS}, got {self.wire!r}")

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    def support_sizes(self) -> torch.Tensor:
        return (self.indices != PAD_ID).sum(dim=1)

    def probs(self) -> torch.Tensor:
        """[n, k] float32 q̂ at the listed indices (0 at padding): ``normalise_rows(values)``."""
        return normalise_rows(self.values)

    def dense(self, vocab_size: int) -> torch.Tensor:
        return scatter_rows(self.indices, self.probs(), vocab_size)

    def prob_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """q̂ of given tokens per row: tokens [n, m] -> [n, m] float32."""
        return values_at(self.indices, self.probs(), tokens)

    def rows(self, start: int, stop: int) -> FloatQ:
        return FloatQ(self.indices[start:stop], self.values[start:stop], self.wire)

    @staticmethod
    def from_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], wire: str) -> FloatQ:
        """Stack per-position (indices [k_j], values [k_j]) rows, padding to the widest."""
        indices, values = stack_rows(rows, torch.float32)
        return FloatQ(indices, values, wire)


def sample_from_float(q: FloatQ, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample from q̂: uniforms [n] or [n, m] in [0, 1) -> token ids, same shape.

    Never returns a token with q̂ = 0 (float rounding at the top end falls back to the last
    positive entry)."""
    squeeze = uniforms.ndim == 1
    u = (uniforms.unsqueeze(1) if squeeze else uniforms).to(torch.float64)  # [n, m]
    probs = q.probs().to(torch.float64)  # multiples of 2**-24: cumsum is exact, last entry 1
    cum = torch.cumsum(probs, dim=1)
    cols = torch.searchsorted(cum, u, right=True)
    last_positive = (probs > 0).to(torch.int64).cumsum(1).argmax(dim=1, keepdim=True)  # [n, 1]
    # NOTE: searchsorted(right=True) skips zero-mass columns (CDF plateaus); the cap only guards
    # the top end, where float rounding can leave cum[-1] * u past every entry.
    cols = torch.minimum(cols, last_positive.expand_as(cols))
    tokens = q.indices.long().gather(1, cols)
    return tokens.squeeze(1) if squeeze else tokens


def baseline_then_sample(logits: torch.Tensor, cfg: SparsifyConfig, wire: str, top_k: int,
                         uniforms: torch.Tensor) -> tuple[torch.Tensor, FloatQ]:
    """The baselines' draft step: q = softmax(logits / T); wire values; sample from q̂.

    logits [n, vocab_size]; uniforms [n] or [n, m]. dsd-*: all vocab entries, rounded to the wire
    dtype. tkslt: the top ``top_k`` of q as fp16. Greedy (T = 0): q is one-hot at the argmax.
    """
    if wire not in FLOAT_WIRE_FORMATS:
        raise ValueError(f"wire must be one of {FLOAT_WIRE_FORMATS}, got {wire!r}")
    logits = logits.detach().to("cpu", torch.float32)
    n, vocab_size = logits.shape
    if cfg.greedy:
        probs = torch.nn.functional.one_hot(logits.argmax(dim=1), vocab_size).to(torch.float32)
    else:
        probs = torch.softmax(logits / cfg.temperature, dim=1)
    if wire == "tkslt":
        values, indices = torch.topk(probs, min(top_k, vocab_size), dim=1)
        indices, order = torch.sort(indices.to(torch.int32), dim=1)
        values = values.gather(1, order).to(torch.float16).to(torch.float32)
    else:
        indices = torch.arange(vocab_size, dtype=torch.int32).expand(n, -1).contiguous()
        values = probs.to(torch.float16).to(torch.float32) if wire == "dsd-fp16" else probs
    q = FloatQ(indices, values, wire)
    return sample_from_float(q, uniforms), q


def concat_rows(parts: list[SparseQ | FloatQ]) -> SparseQ | FloatQ:
    """Stack draft rows of several requests. All SparseQ -> SparseQ.concat; any float rows -> a
    FloatQ holding every row's exact probabilities (c / 2**b is exact in float32)."""
    if all(isinstance(p, SparseQ) for p in parts):
        return SparseQ.concat(parts)  # type: ignore[arg-type]
    wire = next(p.wire for p in parts if isinstance(p, FloatQ))
    width = max(p.indices.shape[1] for p in parts)
    indices, values = [], []
    for p in parts:
        pad = width - p.indices.shape[1]
        indices.append(torch.nn.functional.pad(p.indices, (0, pad), value=PAD_ID))
        # NOTE: float rows keep their wire values, so probs() of the result is the same formula
        # the device sampled from; integer rows become c / 2**b, exact and summing to exactly 1.
        raw = p.values if isinstance(p, FloatQ) else p.probs()
        values.append(torch.nn.functional.pad(raw, (0, pad)))
    return FloatQ(torch.cat(indices), torch.cat(values), wire)
