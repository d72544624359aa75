"""The draft model on the device: per-request KV caches, rollback by cropping, batched decode steps.

Each request keeps a *chain*: its committed sequence followed by speculative tokens the device has
drafted beyond it (each sampled from the sparse q̃ row stored with it). The KV cache always covers a
prefix of that token list and never its last token, so there is at least one token to feed before
the next logits exist:

    tokens:   [ committed (committed_len) | chain (drafted, not yet committed) ]
    cache:    KV of tokens[:cache_len],  cache_len < len(tokens)

A commit that matches the chain keeps both (the chain's tail is conditioned on the new committed
sequence, which is what makes proactive drafting free). A commit that diverges at chain index k
drops the chain and crops the cache to committed_len_old + k tokens: everything before the first
wrong token stays valid, so a rejection costs one forward of the corrected tokens, never a
recompute of the prefix.

Randomness (DESIGN.md rule 6): the draft at absolute position t uses
``position_uniforms(seed, [t], m)``; requests without a seed get a random one at start.
"""

from __future__ import annotations

import copy
import functools
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from vllm_tslt.core.float_q import FloatQ, baseline_then_sample
from vllm_tslt.core.rng import position_uniforms, position_uniforms_many
from vllm_tslt.core.sparsify import SparseQ, SparsifyConfig, sparsify_then_sample
from vllm_tslt.protocol.messages import Draft, PrefixHasher, prefix_hash

logger = logging.getLogger(__name__)

GREEDY_EPS = 1e-5  # vLLM treats temperature < 1e-5 as greedy


def pick_device(device: str) -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; explicit names are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device (--device) is 'cuda' but torch sees no CUDA device")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    return getattr(torch, dtype)


def request_sparsify_config(params: dict[str, Any], base: SparsifyConfig) -> SparsifyConfig:
    """The request's temperature/top-k/top-p (vLLM conventions) narrowed by the agent's truncation."""
    temperature = float(params.get("temperature", 1.0) or 0.0)
    if temperature < GREEDY_EPS:
        temperature = 0.0
    top_k = base.top_k
    req_k = params.get("top_k")
    if isinstance(req_k, int) and req_k > 0:  # vLLM: 0 or -1 means off
        top_k = req_k if top_k is None else min(top_k, req_k)
    top_p = base.top_p
    req_p = params.get("top_p")
    if isinstance(req_p, (int, float)) and 0 < req_p < 1:
        top_p = float(req_p) if top_p is None else min(top_p, float(req_p))
    return SparsifyConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                          k_max=base.k_max, quant_bits=base.quant_bits)


@dataclass
class DraftState:
    """One request's tokens, speculative chain and KV cache (see the module doc)."""

    request_id: str  # vLLM's, for logs
    sparsify: SparsifyConfig
    seed: int
    candidates: int
    tokens: list[int]
    committed_len: int
    cache: Any  # transformers DynamicCache
    hasher: PrefixHasher = field(default_factory=PrefixHasher)  # over tokens[:committed_len]
    # Per chain token: (indices [k], counts [k]), or (indices, wire values) for a baseline format.
    chain_rows: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    chain_alts: list[list[int]] = field(default_factory=list)  # [m - 1] per chain token
    handle: int = 1  # the edge's handle for this request (RequestStart.handle)

    @property
    def cache_len(self) -> int:
        return int(self.cache.get_seq_length())

    @property
    def chain_len(self) -> int:
        return len(self.tokens) - self.committed_len

    def chain_tokens(self) -> list[int]:
        return self.tokens[self.committed_len:]


@functools.cache
def _batch_layer_class() -> type:
    """transformers' DynamicLayer for one batched decode step (imported lazily, like the model):
    ``keys``/``values`` [batch, heads, width, dim] hold the left-padded history, set directly
    (DynamicLayer's constructor path would copy the batch once more); ``update`` appends the one
    new token."""
    from transformers.cache_utils import DynamicLayer

    class BatchLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
            super().__init__()
            self.keys, self.values, self.width = keys, values, width
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.filled = False

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if self.filled or key_states.shape[-2] != 1:
                raise RuntimeError("a batched decode step takes exactly one new token")
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.filled = True
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.width + int(self.filled)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

    return BatchLayer


class CommitMismatch(ValueError):
    """A commit's committed_len does not follow from what the device knows (a lost message)."""


class Drafter:
    """A causal LM from transformers used as the draft model. Not thread-safe: one loop owns it."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto",
                 base: SparsifyConfig | None = None, candidates: int = 1,
                 wire_format: str = "tslt") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model_name = str(model_path)
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        self.base = base or SparsifyConfig(top_k=32)
        self.candidates = candidates
        self.wire_format = wire_format  # "tslt" or a baseline (vllm_tslt.core.float_q)
        self.forward_calls = 0
        from transformers import DynamicCache

        # Batched decode rebuilds plain DynamicLayers; models with sliding/linear layers run alone.
        layers = DynamicCache(config=self.model.config).layers
        self.batchable = all(type(layer).__name__ == "DynamicLayer" for layer in layers)
        self._warm_up()
        logger.info("draft model %s on %s (%s), vocab %d", model_path, self.device, self.dtype,
                    self.vocab_size)

    def _warm_up(self) -> None:
        """One prefill and one cached decode step now, so the first real draft is not the one
        that pays for lazy initialisation (kernels, allocator) and misses the edge's deadline."""
        import torch

        with torch.no_grad():
            ids = torch.zeros(1, 8, dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            self.model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)

    def fingerprint(self) -> str:
        from vllm_tslt.protocol.fingerprint import vocab_fingerprint

        return vocab_fingerprint(self.tokenizer.get_vocab())

    # ------------------------------------------------------------------------------------------
    # Request state
    # ------------------------------------------------------------------------------------------

    def new_state(self, request_id: str, prompt_ids: list[int] | tuple[int, ...],
                  sampling_params: dict[str, Any], k_max: int | None = None,
                  candidates: int | None = None, handle: int = 1) -> DraftState:
        from transformers import DynamicCache

        if not prompt_ids:
            raise ValueError(f"request {request_id}: empty prompt")
        base = self.base
        if k_max is not None and k_max < base.k_max:
            base = SparsifyConfig(base.temperature, base.top_k, base.top_p, k_max, base.quant_bits)
        cfg = request_sparsify_config(sampling_params, base)
        seed = sampling_params.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            seed = secrets.randbits(63)  # unseeded: any seed will do, fixed for the request
        m = 1 if cfg.greedy or self.wire_format != "tslt" else (candidates or self.candidates)
        tokens = [int(t) for t in prompt_ids]
        return DraftState(request_id, cfg, seed, m, tokens, len(tokens),
                          DynamicCache(config=self.model.config), PrefixHasher(tokens),
                          handle=handle)

    def commit(self, state: DraftState, committed_len: int, new_tokens: tuple[int, ...]) -> int:
        """Apply a commit. Returns how many chain tokens it confirmed (-1: it diverged).

        Raises CommitMismatch if committed_len != known committed length + len(new_tokens).
        """
        old = state.committed_len
        if committed_len != old + len(new_tokens):
            raise CommitMismatch(f"{state.request_id}: commit to {committed_len} after {old} "
                                 f"with {len(new_tokens)} new tokens")
        chain = state.chain_tokens()
        k = 0
        while k < min(len(chain), len(new_tokens)) and chain[k] == new_tokens[k]:
            k += 1
        state.hasher.update(new_tokens)
        if k == len(new_tokens):  # the chain continues the committed sequence: keep it all
            state.committed_len = committed_len
            del state.chain_rows[:k], state.chain_alts[:k]
            return k
        # Diverged at chain index k: keep the KV of tokens[:old + k], feed the rest next time.
        # NOTE: cropping is exact (rows of a causal KV cache never depend on later tokens).
        keep = min(state.cache_len, old + k)
        if keep < state.cache_len:
            state.cache.crop(keep - state.cache_len)  # negative: tokens to remove
        state.tokens = state.tokens[:old] + [int(t) for t in new_tokens]
        state.committed_len = committed_len
        state.chain_rows.clear()
        state.chain_alts.clear()
        return -1

    def fork(self, state: DraftState, keep: int, token: int) -> DraftState:
        """A branch of ``state``: its tokens[:keep] + [token], *committed* at that length (the
        prefix the branch assumes), with an empty chain. Branches draft for verification outcomes
        the device does not know yet (runtime: send-ahead branches).

        NOTE: the branch's cache is a cropped *copy* of the first ``keep`` positions of
        ``state``'s KV (``DynamicCache(ddp_cache_data=...)`` concatenates into new tensors), so
        the two never share a tensor that a later step could write into (``_forward_batched``
        rebinds layers to views of its batch buffer). Memory: one prefix KV per branch, and the
        runtime keeps at most ``MAX_BRANCH_BUDGET`` branches per request, dropped at each commit.
        """
        from transformers import DynamicCache

        if not self.batchable:
            raise ValueError("fork needs plain DynamicLayer caches (this draft model has others)")
        if not 0 < keep <= len(state.tokens):
            raise ValueError(f"fork at {keep} of {len(state.tokens)} tokens")
        kv_len = min(keep, state.cache_len)
        kv = [(layer.keys[:, :, :kv_len], layer.values[:, :, :kv_len])
              for layer in state.cache.layers if layer.is_initialized]
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache(config=self.model.config)
        tokens = [*state.tokens[:keep], int(token)]
        return DraftState(state.request_id, state.sparsify, state.seed, state.candidates, tokens,
                          len(tokens), cache, PrefixHasher(tokens), handle=state.handle)

    def draft_message(self, state: DraftState, gamma: int, offset: int = 0) -> Draft:
        """A Draft of chain[offset:offset + gamma], conditioned on tokens[:committed_len + offset].

        offset > 0 drafts *ahead*: for the sequence the device expects once the edge accepts the
        first ``offset`` chain tokens (requires chain_len >= offset + gamma, gamma >= 1).
        """
        rows = state.chain_rows[offset:offset + gamma]
        q: SparseQ | FloatQ
        if self.wire_format != "tslt":
            q = FloatQ.from_rows(rows, self.wire_format)
        else:
            q = SparseQ.from_rows(rows, state.sparsify.quant_bits)
        start = state.committed_len + offset
        tokens = torch.tensor(state.tokens[start:start + gamma], dtype=torch.int64)
        alts = None
        if state.candidates > 1:
            alts = torch.tensor(state.chain_alts[offset:offset + gamma], dtype=torch.int64)
            alts = alts.view(gamma, -1)
        phash = state.hasher.value() if offset == 0 else prefix_hash(state.tokens[:start])
        return Draft(state.handle, start, phash, tokens, q, alts)

    # ------------------------------------------------------------------------------------------
    # Forward passes
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def extend(self, states: list[DraftState]) -> None:
        """Draft one more chain token for each state; single-token feeds share one forward."""
        singles = [s for s in states if len(s.tokens) - s.cache_len == 1] if self.batchable else []
        # Keyed by the state object: a request's branches (fork) share its request id.
        logits: dict[int, torch.Tensor] = {}
        for s in states:
            if len(s.tokens) - s.cache_len != 1 or len(singles) == 1:
                logits[id(s)] = self._forward_one(s)  # prefill / catch-up
        if len(singles) > 1:
            logits.update(zip((id(s) for s in singles), self._forward_batched(singles)))
        self._sample_all(states, [logits[id(s)] for s in states])

    def _forward_one(self, state: DraftState) -> torch.Tensor:
        """Feed tokens[cache_len:] through the cache -> [vocab_size] float32 logits of the last."""
        start = state.cache_len
        ids = torch.tensor([state.tokens[start:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=state.cache, use_cache=True,
                         logits_to_keep=1)
        self.forward_calls += 1
        return out.logits[0, -1].float()

    def _forward_batched(self, states: list[DraftState]) -> list[torch.Tensor]:
        """One decode step for several requests: caches left-padded and masked, then split back."""
        from transformers import DynamicCache

        lens = [s.cache_len for s in states]
        width = max(lens)
        batch = len(states)
        mask = torch.zeros((batch, width + 1), dtype=torch.long, device=self.device)
        for i, n in enumerate(lens):
            mask[i, width - n:] = 1
        layers = []
        for layer_idx in range(len(states[0].cache.layers)):
            # Left-padded [batch, heads, width, dim] in one call per tensor (pad_sequence over
            # [len, heads, dim] views); the forward appends the new token with one cat.
            own = [s.cache.layers[layer_idx] for s in states]
            keys, values = (pad_sequence([getattr(x, name)[0].transpose(0, 1) for x in own],
                                         batch_first=True, padding_side="left").transpose(1, 2)
                            for name in ("keys", "values"))
            layers.append(_batch_layer_class()(keys, values, width))
        cache = DynamicCache()
        cache.layers = layers
        ids = torch.tensor([[s.tokens[-1]] for s in states], dtype=torch.long, device=self.device)
        pos = torch.tensor([[n] for n in lens], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=cache, use_cache=True)
        self.forward_calls += 1
        for i, (s, n) in enumerate(zip(states, lens)):
            for own, layer in zip(s.cache.layers, layers):  # views of the batch's buffers
                own.keys = layer.keys[i:i + 1, :, width - n:]
                own.values = layer.values[i:i + 1, :, width - n:]
        return [out.logits[i, -1].float() for i in range(batch)]

    def _sample_all(self, states: list[DraftState], logits: list[torch.Tensor]) -> None:
        """Sparsify-then-sample the token at absolute position len(tokens) of every state; append
        it to its chain. States with the same truncation share one batched call: every step of
        sparsify-then-sample is row-wise, so a row's q̃ and token are the ones a call for that row
        alone gives (tests/unit/test_agent_drafter.py checks it), and the uniforms are still
        position_uniforms(seed, [t]) per state (DESIGN.md rule 6)."""
        if self.wire_format != "tslt":
            for s, row in zip(states, logits):
                self._sample_next(s, row)
            return
        groups: dict[tuple[SparsifyConfig, int], list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault((s.sparsify, s.candidates), []).append(i)
        for (cfg, m), rows in groups.items():
            batch = [states[i] for i in rows]
            uniforms = position_uniforms_many([s.seed for s in batch],
                                              [len(s.tokens) for s in batch], m)  # [n, m]
            stacked = torch.stack([logits[i].view(-1) for i in rows]).cpu()
            tokens, q = sparsify_then_sample(stacked, cfg, uniforms)
            widths = q.support_sizes().tolist()
            for j, s in enumerate(batch):
                s.chain_rows.append((q.indices[j, :widths[j]].clone(),
                                     q.counts[j, :widths[j]].clone()))
                s.chain_alts.append([int(t) for t in tokens[j, 1:]])
                s.tokens.append(int(tokens[j, 0]))

    def _sample_next(self, state: DraftState, logits: torch.Tensor) -> None:
        """Sample one state's next token (see ``_sample_all``); baselines sample from the q̂ their
        wire values define."""
        if self.wire_format == "tslt":
            self._sample_all([state], [logits])
            return
        uniforms = position_uniforms(state.seed, [len(state.tokens)], state.candidates)
        tokens, fq = baseline_then_sample(logits.view(1, -1).cpu(), state.sparsify,
                                          self.wire_format, self.base.top_k or 1, uniforms)
        state.chain_rows.append((fq.indices[0].clone(), fq.values[0].clone()))
        state.chain_alts.append([])
        state.tokens.append(int(tokens[0, 0]))

    # ------------------------------------------------------------------------------------------
    # Checks (tests, debugging)
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def peek_logits(self, state: DraftState) -> torch.Tensor:
        """[vocab_size] logits for the next token through a copy of the state's cache."""
        probe = copy.copy(state)
        probe.cache = copy.deepcopy(state.cache)
        return self._forward_one(probe)

    @torch.inference_mode()
    def recompute_logits(self, tokens: list[int]) -> torch.Tensor:
        """[vocab_size] next-token logits from scratch (no cache): the reference for rollback."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits[0, -1].float()
