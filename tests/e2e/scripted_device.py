"""A minimal scripted device for the edge's end-to-end tests (the real one is vllm_tslt.agent).

It handshakes, then for every RequestStart/Commit drafts γ tokens with the draft model
(full recompute, no KV cache), sparsify-then-sample, and sends them. `mode="garbage"` sends junk.
"""

from __future__ import annotations

import random
import threading

import torch
import zmq

from vllm_tslt.core.sparsify import SparsifyConfig, sparsify_then_sample
from vllm_tslt.protocol import (
    PROTOCOL_VERSION,
    Commit,
    DecodeLimits,
    Draft,
    End,
    Error,
    Handshake,
    RequestStart,
    decode,
    encode,
    prefix_hash,
    vocab_fingerprint,
)


class ScriptedDevice:
    def __init__(self, endpoint: str, draft_dir, gamma: int = 4, top_k: int = 16,
                 mode: str = "draft", fingerprint: str | None = None, candidates: int = 1) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(draft_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
        self.vocab_size = self.model.config.vocab_size
        self.fingerprint = fingerprint or vocab_fingerprint(tok.get_vocab())
        self.gamma, self.top_k, self.mode, self.candidates = gamma, top_k, mode, candidates
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.limits = DecodeLimits(vocab_size=self.vocab_size)
        self.session_id = ""
        self.reply: Handshake | Error | None = None
        self.sequences: dict[str, list[int]] = {}
        self.params: dict[str, dict] = {}
        self.drafts_sent = 0
        self.uplink_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def handshake(self, timeout_ms: int = 10_000) -> Handshake | Error:
        self.sock.send(encode(Handshake(PROTOCOL_VERSION, self.vocab_size, self.fingerprint,
                                        "tiny-draft")))
        assert self.sock.poll(timeout_ms), "edge did not answer the handshake"
        self.reply = decode(self.sock.recv(), self.limits)
        if isinstance(self.reply, Handshake):
            self.session_id = self.reply.session_id
        return self.reply

    def start(self) -> ScriptedDevice:
        self._thread.start()
        return self

    def start_after_handshake(self) -> ScriptedDevice:
        reply = self.handshake()
        assert isinstance(reply, Handshake), reply
        return self.start()

    def goodbye(self) -> None:
        """Tell the edge this device is leaving (End with an empty request id)."""
        self.sock.send(encode(End("", "bye")))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close(linger=0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            msg = decode(self.sock.recv(), self.limits)
            if isinstance(msg, RequestStart):
                self.sequences[msg.request_id] = list(msg.prompt_ids)
                self.params[msg.request_id] = msg.sampling_params
            elif isinstance(msg, Commit) and msg.request_id in self.sequences:
                seq = self.sequences[msg.request_id]
                seq.extend(msg.new_tokens)
                assert len(seq) == msg.committed_len
                self._send_draft(msg.request_id, seq)
            elif isinstance(msg, End):
                self.sequences.pop(msg.request_id, None)

    @torch.no_grad()
    def _send_draft(self, request_id: str, seq: list[int]) -> None:
        if self.mode == "garbage":
            data = b"\x93\x01\x04" + bytes(range(256)) * 3
        elif self.mode == "lying":
            data = encode(self._lying_draft(request_id, seq))
        else:
            temperature = float(self.params[request_id].get("temperature", 1.0))
            cfg = SparsifyConfig(temperature=temperature, top_k=self.top_k, quant_bits=12)
            ids = list(seq)
            tokens, rows, alts = [], [], []
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
            from vllm_tslt.core.sparsify import SparseQ

            draft = Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens),
                          SparseQ.concat(rows),
                          torch.stack(alts) if self.candidates > 1 else None)
            data = encode(draft)
        self.sock.send(data)
        self.drafts_sent += 1
        self.uplink_bytes += len(data)

    @torch.no_grad()
    def _lying_draft(self, request_id: str, seq: list[int]) -> Draft:
        """Drafts the draft model's argmax but claims q̃ uniform over its top-16: NOT a sample
        from the q̃ it sends (breaks DESIGN.md rule 1), so verification is biased towards it."""
        from vllm_tslt.core.sparsify import SparseQ

        ids, tokens, indices = list(seq), [], []
        for _ in range(self.gamma):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 16).indices
            tokens.append(int(top[0]))
            indices.append(top.sort().values.to(torch.int32))
            ids.append(int(top[0]))
        q = SparseQ(torch.stack(indices), torch.full((self.gamma, 16), 256, dtype=torch.int32), 12)
        return Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens), q)
