"""Structured outputs stay exact with a device drafting (issue 18 item 1; DESIGN.md rule 8).

vLLM cuts a draft at its first grammar-invalid token and, unpatched, emits a bonus token from the
grammar-masked target p there; exact verification rejects that token against its q̃ row and samples
the residual norm(max(0, p - q̃)). The difference, q̃(invalid)·TV(p, residual) per position, is
invisible with a draft model that ignores the grammar (its invalid tokens carry little mass shaped
unlike p), so the honest device here is built to expose it: its model is a copy of the target (a
well-matched draft), at every position it knows the valid set V (xgrammar, like the edge), and it
drafts from

    q̃ = 1/2 · δ(its best valid token) + 1/2 · δ(its best invalid token)

which it samples from exactly (it is honest; DESIGN.md rule 1). The bias of the unpatched cut at
the first output position is computed from the target before sampling (asserted >= 0.03).

Per constraint (regex and JSON schema), one server serves four arms of 600 (regex) or 1,200 (JSON)
samples each:
the edge alone; the honest device (the fix); the honest device with vLLM's cut re-introduced
through a test-only switch (negative control: must be rejected, p < 1e-6); and the honest device
with the one-hot alternative (exact too; measured for its acceptance). Each arm's token
distribution at positions 1..3, and the pair at positions 1-2, is compared with the edge alone by
chi-square tests of homogeneity (the smallest p-value of the four is reported).
"""

from __future__ import annotations

import json
import logging
import random
import time

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from vllm_tslt.core.sparsify import SparseQ
from vllm_tslt.protocol import Draft, prefix_hash
from vllm_tslt.testing.devices import ModelDevice

from .server import free_port, metrics, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.statistical]
logger = logging.getLogger(__name__)

SAMPLES = {"regex": 1200, "json": 1200}  # per arm (600 left the regex control at p ~1e-7..7e-6)
LENGTH = {"regex": 3, "json": 3}  # tokens compared per sample
PROMPT = "    def "
REGEX = r"[a-z_]{2,12}\("
SCHEMA = {"type": "integer", "minimum": 0}  # a free first position: the test needs power there
CONSTRAINTS = {"regex": {"regex": REGEX}, "json": {"json": SCHEMA}}
P_HONEST, P_CONTROL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def edge(tiny_pair, tmp_path_factory):
    hub_port = free_port()
    spec = {"method": "tslt", "num_speculative_tokens": 4, "bind": f"tcp://127.0.0.1:{hub_port}",
            "draft_deadline_ms": 3000}
    log = tmp_path_factory.mktemp("edge-structured") / "vllm.log"
    # VLLM_TSLT_TEST_SWITCHES allows the negative control's per-request switch on this server only
    with vllm_server(tiny_pair.target, log, spec, env={"VLLM_TSLT_TEST_SWITCHES": "1"}) as url:
        yield {"url": url, "hub": f"tcp://127.0.0.1:{hub_port}", "log": log}


@pytest.fixture(scope="module")
def grammars(tiny_pair):
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pair.target))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)
    return {"tokenizer": tok, "vocab_size": len(tok),
            "regex": compiler.compile_regex(REGEX),
            "json": compiler.compile_json_schema(json.dumps(SCHEMA))}


def _valid_mask(matcher, vocab_size: int) -> torch.Tensor:
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    bits = bitmask[0].numpy().view(np.uint32)
    unpacked = (bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return torch.from_numpy(unpacked.reshape(-1)[:vocab_size].astype(bool))


class GrammarDevice(ModelDevice):
    """Honest device whose q̃ puts half its mass on a grammar-invalid token (see module doc)."""

    def __init__(self, endpoint, draft_dir, compiled, vocab_size: int, prompt_len: int) -> None:
        super().__init__(endpoint, draft_dir, gamma=4)
        self.compiled, self.grammar_vocab, self.prompt_len = compiled, vocab_size, prompt_len

    @torch.no_grad()
    def _draft(self, request_id, seq: list[int]) -> Draft:
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compiled)
        for t in seq[self.prompt_len:]:
            matcher.accept_token(t)
        gen = torch.Generator().manual_seed(random.getrandbits(62))
        ids, tokens, rows, constrained = list(seq), [], [], True
        for _ in range(self.gamma):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1, : self.grammar_vocab]
            constrained = constrained and not matcher.is_terminated()
            valid = _valid_mask(matcher, self.grammar_vocab) if constrained else \
                torch.ones_like(logits, dtype=torch.bool)
            choices = _design(valid, logits)
            counts = [4096 // len(choices)] * len(choices)
            pick = choices[int(torch.randint(len(choices), (1,), generator=gen))]
            tokens.append(pick)
            rows.append(SparseQ(torch.tensor([choices], dtype=torch.int32),
                                torch.tensor([counts], dtype=torch.int32), 12))
            ids.append(pick)
            constrained = constrained and bool(valid[pick]) and matcher.accept_token(pick)
        return Draft(request_id, len(seq), prefix_hash(seq), torch.tensor(tokens),
                     SparseQ.concat(rows))


def _design(valid: torch.Tensor, draft_logits: torch.Tensor) -> list[int]:
    """The device's candidates: its best valid token and, if any, its best invalid one."""
    good = int(torch.where(valid, draft_logits, -torch.inf).argmax())
    if valid.all():
        return [good]
    return sorted({good, int(torch.where(valid, -torch.inf, draft_logits).argmax())})


def _first_position_bias(reference, grammars, name: str) -> float:
    """q̃(invalid) · TV(p, norm(max(0, p - q̃))) at the first output position: what vLLM's cut
    shifts there (p the grammar-masked target, q̃ the device's row). Computed before sampling, so
    the test is known to have power."""
    import xgrammar as xgr

    tok, target = reference
    vocab = grammars["vocab_size"]
    valid = _valid_mask(xgr.GrammarMatcher(grammars[name]), vocab)
    with torch.no_grad():
        logits = target(input_ids=torch.tensor([tok(PROMPT).input_ids])).logits[0, -1, :vocab]
    p = torch.where(valid, torch.softmax(logits.double(), -1), 0.0)
    p = p / p.sum()
    choices = _design(valid, logits)
    q = torch.zeros(vocab, dtype=torch.float64)
    q[choices] = 1.0 / len(choices)
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum()
    return float(q[~valid].sum()) * 0.5 * float((p - residual).abs().sum())


def _sample(client, model: str, name: str, extra: dict) -> list[tuple[int, ...]]:
    out = []
    for _ in range(SAMPLES[name] // 50):
        resp = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=LENGTH[name], n=50, temperature=1.0,
            extra_body={"structured_outputs": CONSTRAINTS[name], "return_token_ids": True,
                        **extra})
        out.extend(tuple(c.token_ids) for c in resp.choices)
    return out


def _homogeneity_p(a: list[tuple[int, ...]], b: list[tuple[int, ...]], position) -> float:
    """Chi-square homogeneity of the token at `position`, or of the token pair at a slice of
    positions (the bias at position 2 depends on token 1; the joint keeps those strata apart).
    Values seen fewer than 10 times in both samples together are pooled."""
    def cell(s):
        return tuple(s[position]) if isinstance(position, slice) else (
            s[position] if len(s) > position else -1)

    xa, xb = [cell(s) for s in a], [cell(s) for s in b]
    keys = sorted(set(xa) | set(xb))
    table = np.array([[xa.count(k) for k in keys], [xb.count(k) for k in keys]])
    big = table.sum(axis=0) >= 10
    table = np.concatenate([table[:, big], table[:, ~big].sum(axis=1, keepdims=True)], axis=1)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table)[1])


def _tv(a, b, position: int) -> float:
    xa = [s[position] for s in a if len(s) > position]
    xb = [s[position] for s in b if len(s) > position]
    keys = set(xa) | set(xb)
    return 0.5 * sum(abs(xa.count(k) / len(xa) - xb.count(k) / len(xb)) for k in keys)


def _spec_counters(url: str) -> tuple[float, float, float]:
    """vLLM's counters: (accepted tokens, draft tokens, draft steps)."""
    m = metrics(url)

    def total(prefix: str) -> float:
        return sum(v for k, v in m.items() if k.startswith(prefix))

    return (total("vllm:spec_decode_num_accepted_tokens_total"),
            total("vllm:spec_decode_num_draft_tokens_total"),
            total("vllm:spec_decode_num_drafts_total"))


@pytest.mark.parametrize("name", ["regex", "json"])
def test_constrained_samples_with_device_equal_edge_alone(edge, grammars, tiny_pair, name,
                                                          reference):
    from openai import OpenAI

    bias = _first_position_bias(reference, grammars, name)
    assert bias >= 0.03, f"{name}: the setting has no power (first-position bias {bias:.3f})"
    client = OpenAI(base_url=edge["url"] + "/v1", api_key="unused", timeout=600)
    model = client.models.list().data[0].id
    alone = _sample(client, model, name, {})
    dev = GrammarDevice(edge["hub"], tiny_pair.target, grammars[name], grammars["vocab_size"],
                        len(grammars["tokenizer"](PROMPT).input_ids))
    dev.start_after_handshake()
    arms, accept = {}, {}
    try:
        for arm, switch in (("honest", None), ("truncate", "truncate"), ("one_hot", "one_hot")):
            xargs = {"tslt_session": dev.session_id}
            if switch:
                xargs["tslt_test_structured_cut"] = switch
            before = _spec_counters(edge["url"])
            arms[arm] = _sample(client, model, name, {"vllm_xargs": xargs})
            time.sleep(1.5)  # vLLM publishes its counters periodically
            accepted, drafted, steps = (b - a for a, b in zip(before, _spec_counters(edge["url"])))
            # per draft token and per drafted step (vLLM's counters: the reject slot counts the
            # grammar-invalid token as a draft token and its step as a drafted step, vLLM's cut
            # drops both), and per generated token (the one figure comparable across arms)
            generated = sum(len(s) for s in arms[arm])
            accept[arm] = (round(accepted / max(drafted, 1), 3), round(accepted / max(steps, 1), 3),
                           round(accepted / max(generated, 1), 3))
    finally:
        dev.stop()
    tests = [*range(LENGTH[name]), slice(0, 2)]  # each position, and the first two jointly
    p = {arm: min(_homogeneity_p(s, alone, t) for t in tests) for arm, s in arms.items()}
    tv = {arm: max(_tv(s, alone, i) for i in range(LENGTH[name])) for arm, s in arms.items()}
    logger.warning("structured %s: first-position bias (theory) %.3f; min p %s; largest TV per position "
                   "vs edge alone %s; acceptance (per draft token, per draft step, per output token) %s (%d samples per arm)", name, bias, p, tv,
                   accept, SAMPLES[name])
    print(f"\n[structured {name}] theory bias {bias:.3f} | min p {p} | max TV {tv} | "
          f"acceptance {accept} | {SAMPLES[name]} samples per arm")
    assert p["honest"] > P_HONEST, f"{name}: honest device changed the output (p={p['honest']:.2e})"
    assert p["one_hot"] > P_HONEST, f"{name}: one-hot cut changed the output ({p['one_hot']:.2e})"
    assert p["truncate"] < P_CONTROL, \
        f"{name}: negative control (vLLM's cut) not detected: p={p['truncate']:.2e}"
    assert "Unexpected: grammar terminated" not in edge["log"].read_text()

