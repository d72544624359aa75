"""Scripted devices that draft (the real device is vllm_tslt.agent): ``ScriptedPeer`` subclasses.

- ``TableDevice``: drafts γ tokens from a table model (vllm_tslt.testing.targets.TableTarget, e.g.
  the target itself or ``target.perturbed(...)``) with sparsify-then-sample at each request's
  temperature: honest, cheap, no model files; ``delay_s`` makes it a slow device (each draft
  leaves that long after the commit it answers).
- ``ModelDevice``: drafts with a transformers draft model (full recompute, no KV cache), optionally
  with alternatives (multi-candidate); ``mode="garbage"`` sends junk bytes and ``mode="lying"``
  drafts the argmax while claiming a uniform q̃ (the negative control of the exactness tests).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from vllm_tslt.core.sparsify import SparseQ, SparsifyConfig, sparsify_then_sample
from vllm_tslt.protocol import Draft, End, Handshake, prefix_hash, vocab_fingerprint

from .peers import ScriptedPeer
from .targets import TableTarget


class TableDevice(ScriptedPeer):
    """Drafts γ tokens from `draft` (top-k, `quant_bits` counts), honestly sampled from q̃."""

    def __init__(self, endpoint: str, draft: TableTarget, *, gamma: int = 3, top_k: int = 16,
                 quant_bits: int = 12, seed: int = 0, name: str = "", delay_s: float = 0.0,
                 **options: Any) -> None:
        super().__init__(endpoint, draft.vocab_size, name or f"table{seed}", **options)
        self.draft = draft
        self.delay_s = delay_s
        self.gamma, self.top_k, self.quant_bits = gamma, top_k, quant_bits
        self.gen = torch.Generator().manual_seed(seed)

    def on_context(self, request_id: str) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        seq = self.context(request_id)
        temperature = float(self.params[request_id].get("temperature", 1.0))
        cfg = SparsifyConfig(temperature=temperature, top_k=self.top_k, quant_bits=self.quant_bits)
        ctx, tokens, rows = list(seq), [], []
        for _ in range(self.gamma):
            logits = torch.log(self.draft.next_probs(ctx)).float().view(1, -1)  # [1, V]
            tok, q = sparsify_then_sample(logits, cfg, self.gen)
            tokens.append(int(tok[0]))
            rows.append(q)
            ctx.append(int(tok[0]))
        self.send(Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens),
                        SparseQ.concat(rows)), "draft")


class ModelDevice(ScriptedPeer):
    """Drafts with a transformers model directory (the tiny pair's draft in the e2e tests)."""

    def __init__(self, endpoint: str, draft_dir: Any, gamma: int = 4, top_k: int = 16,
                 mode: str = "draft", fingerprint: str | None = None, candidates: int = 1) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if mode not in ("draft", "garbage", "lying"):
            raise ValueError(f"mode must be 'draft', 'garbage' or 'lying', got {mode!r}")
        tok = AutoTokenizer.from_pretrained(str(draft_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
        super().__init__(endpoint, self.model.config.vocab_size, "tiny-draft",
                         fingerprint=fingerprint or vocab_fingerprint(tok.get_vocab()))
        self.gamma, self.top_k, self.mode, self.candidates = gamma, top_k, mode, candidates

    def start_after_handshake(self) -> ModelDevice:
        reply = self.handshake()
        assert isinstance(reply, Handshake), reply
        self.start()
        return self

    def goodbye(self) -> None:
        """Tell the edge this device is leaving (End with an empty request id)."""
        self.send(End(0, "bye"))

    @torch.no_grad()
    def on_context(self, request_id: str) -> None:
        seq = self.context(request_id)
        if self.mode == "garbage":
            self.send_bytes(b"\x93\x01\x04" + bytes(range(256)) * 3, "garbage")
        elif self.mode == "lying":
            self.send(self._lying_draft(request_id, seq), "lying")
        else:
            self.send(self._draft(request_id, seq), "draft")

    def _draft(self, request_id: str, seq: list[int]) -> Draft:
        temperature = float(self.params[request_id].get("temperature", 1.0))
        cfg = SparsifyConfig(temperature=temperature, top_k=self.top_k, quant_bits=12)
        ids, tokens, rows, alts = list(seq), [], [], []
        # Fresh randomness per draft: the draft token must be a sample from q̃ (a fixed seed per
        # position would make it a fixed token across requests, which biases the output).
        gen = torch.Generator().manual_seed(random.getrandbits(62))
        for _ in range(self.gamma):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1:]
            uniforms = torch.rand(1, self.candidates, dtype=torch.float64, generator=gen)
            tok, q = sparsify_then_sample(logits, cfg, uniforms)  # [1, m]: spine first
            tokens.append(int(tok[0, 0]))
            alts.append(tok[0, 1:])
            rows.append(q)
            ids.append(int(tok[0, 0]))
        return Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens),
                     SparseQ.concat(rows), torch.stack(alts) if self.candidates > 1 else None)

    def _lying_draft(self, request_id: str, seq: list[int]) -> Draft:
        """Drafts the draft model's argmax but claims q̃ uniform over its top-16: NOT a sample
        from the q̃ it sends (breaks DESIGN.md rule 1), so verification is biased towards it."""
        ids, tokens, indices = list(seq), [], []
        for _ in range(self.gamma):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 16).indices
            tokens.append(int(top[0]))
            indices.append(top.sort().values.to(torch.int32))
            ids.append(int(top[0]))
        q = SparseQ(torch.stack(indices), torch.full((self.gamma, 16), 256, dtype=torch.int32), 12)
        return Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens), q)
