"""The remote-draft proxy: vLLM's proposer (`custom_class`) replaced by drafts from devices.

vLLM calls `propose(...)` after each step without request ids; `vllm_tslt.patches.runner` binds the
model runner and the step's scheduler output first (`bind_step`), so the proxy can see which request
is which, send each device its committed tokens, collect drafts (`edge/intake.py` decides per step
whether to wait for a late draft, park its request, or decode it plainly), and later hand the
rejection sampler the exact sparse q̃ each drafted token was sampled from (`draft_probs`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from vllm_tslt import envs
from vllm_tslt.core.float_q import FloatQ, concat_rows
from vllm_tslt.core.sparsify import SparseQ
from vllm_tslt.patches.draft_flag import DraftFlagWriter
from vllm_tslt.patches.structured import cut_mode
from vllm_tslt.protocol import Draft, vocab_fingerprint

from .config import TsltConfig
from .hub import DraftHub
from .intake import Intake, StepCost
from .parallel import EdgeParallel, InertHub
from .stats import StatsWriter
from .verify import SparseDraftProbs

logger = logging.getLogger(__name__)

SESSION_KEY = "tslt_session"  # vllm_xargs / SamplingParams.extra_args key naming the device session
# Test-only (VLLM_TSLT_TEST_SWITCHES=1): TP ranks other than 0 verify this request's drafts with
# one-hot rows instead of rank 0's q̃ (the negative control of the tp_check debug check).
TEST_TP_PERTURB_KEY = "tslt_test_tp_perturb"
# Test-only (VLLM_TSLT_TEST_SWITCHES=1): this request's intake decisions (wait, park, plain) are
# drawn at random from the given seed instead of by the policy (Intake.shuffle).
TEST_INTAKE_SHUFFLE_KEY = "tslt_test_intake_shuffle"


def request_params(sampling_params: Any, max_gamma: int) -> dict[str, Any]:
    """What a device needs of a request's sampling params to draft well (scalars only)."""
    return {
        "temperature": float(sampling_params.temperature),
        "top_p": float(sampling_params.top_p),
        "top_k": int(sampling_params.top_k or 0),
        "seed": sampling_params.seed,
        "max_tokens": sampling_params.max_tokens,
        "max_gamma": max_gamma,
    }


class TsltProposer:
    """`speculative_config.method = "tslt"` (registered with vLLM as a `custom_class` proposer)."""

    def __init__(self, vllm_config: Any) -> None:
        options = (vllm_config.additional_config or {}).get("tslt", {})
        config = TsltConfig.from_dict(options)
        # TP: rank 0 alone owns the hub and broadcasts q̃; DP: one hub per rank (edge/parallel.py).
        self.parallel = EdgeParallel.from_vllm_config(vllm_config, config)
        self.config = self.parallel.rank_config(config, options)
        model_config = vllm_config.model_config
        self.max_gamma = int(vllm_config.speculative_config.num_speculative_tokens)
        self.vocab_size = int(model_config.get_vocab_size())
        served = model_config.served_model_name
        model_name = served[0] if isinstance(served, list) else (served or model_config.model)
        self.hub: DraftHub | InertHub = InertHub()
        self.stats: StatsWriter | None = None
        # Tells the engine core whether this step's draft round trip can be skipped (the output
        # rank owns the hub: its answer is the one the scheduler takes).
        self.draft_flag: DraftFlagWriter | None = None
        if self.parallel.owns_hub:
            self.draft_flag = DraftFlagWriter()
            self.hub = DraftHub(self.config, vocab_size=self.vocab_size,
                                vocab_fingerprint=_tokenizer_fingerprint(model_config),
                                model_name=str(model_config.model if served is None
                                               else model_name),
                                max_gamma=self.max_gamma)
            self.hub.io.extra_limits.update(self.parallel.handshake_limits())
            self.hub.start()
            self.stats = StatsWriter(self.hub, self.config.stats_path or None).start()
        self._runner: Any = None
        self._committed: dict[str, int] = {}  # request -> committed length sent (-1: unbound)
        self._max_len: dict[str, int] = {}  # request -> prompt + max_tokens
        # The drafts handed to the scheduler by the last propose(), and the step that proposed
        # them: vLLM verifies step N's drafts in step N + 1 only; any other use (the drafter
        # skipped a step, the request was not scheduled) falls back to one-hot rows.
        self._pending: dict[str, tuple[Draft, int]] = {}  # request -> (draft, tokens handed out)
        self._pending_step = -1
        self._step = 0  # engine steps begun (model runner state updates)
        self._cut_mode: dict[str, str] = {}  # structured-output requests -> patches.structured mode
        # request -> (prompt length, min_tokens) while min_tokens > 0: see _min_tokens_cap
        self._min_tokens: dict[str, tuple[int, int]] = {}
        self.step_cost = StepCost()
        self._status_at = 0.0
        self.intake = Intake.from_config(self.config)
        # Requests whose draft tokens vLLM verified in the step now ending -> how many (bind_step).
        self._verified: dict[str, int] = {}
        # For the scheduler, via take_draft_token_ids (patches/runner.py, patches/scheduler.py):
        # drafts of parked requests (not in the batch) and the requests to park next step.
        self._extra_drafts: dict[str, list[int]] = {}
        self._park_next: list[str] = []

    # vLLM's CPU runner calls this with the target model; nothing to load here.
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        return None

    def bind_step(self, runner: Any, scheduler_output: Any) -> None:
        """Called before `propose` with the step's scheduler output: the draft tokens vLLM
        verified in this step per request (after its own cuts: token budget, max_model_len,
        grammar), what the commits tell the devices (`Commit.verified`)."""
        self._runner = runner
        spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
        self._verified = {rid: len(tokens) for rid, tokens in spec.items() if tokens}

    def begin_step(self, finished_req_ids: Any) -> None:
        """A new engine step begins (the model runner's state update, also in a step with nothing
        to compute); vLLM finished or aborted `finished_req_ids`, so the last request of a burst
        is freed too."""
        self._step += 1
        if self.draft_flag is not None:
            self.draft_flag.step_begins()
        for rid in finished_req_ids or ():
            self.hub.end_request(rid, "finished")
            self._committed.pop(rid, None)
            self._max_len.pop(rid, None)
            self._pending.pop(rid, None)
            self._cut_mode.pop(rid, None)
            self._min_tokens.pop(rid, None)
            self.intake.forget(rid)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any,
                token_ids_cpu: Any, slot_mappings: Any = None) -> list[list[int]]:
        """Draft token ids per request in batch order (empty list: no draft this step)."""
        t0 = time.perf_counter()
        runner = self._runner
        req_ids = list(runner.input_batch.req_ids)
        self.step_cost.step_started(t0, req_ids)
        bound, ending = [], 0  # ending: requests this step ends (a park must leave one running)
        for i, rid in enumerate(req_ids):
            if rid in self._verified and sampled_token_ids[i]:  # tokens of a drafted step
                self.intake.observe(rid, len(sampled_token_ids[i]))
                self._count_round(rid, len(sampled_token_ids[i]))
            if self._commit(runner, rid, i, sampled_token_ids[i], num_tokens_no_spec,
                            token_ids_cpu):
                bound.append(rid)
            ending += int(num_tokens_no_spec[i]) >= self._max_len.get(rid, 1 << 62)
        t1 = time.perf_counter()
        drafts, self._park_next = (self.intake.gather(self.hub, bound, len(req_ids) - ending,
                                                      self._step_cost_now())
                                   if bound or self.intake.parked else ({}, []))
        t2 = time.perf_counter()
        out: list[list[int]] = []
        self._pending, self._pending_step = {}, self._step
        for i, rid in enumerate(req_ids):
            out.append(self._hand_out(rid, drafts.get(rid), int(num_tokens_no_spec[i])))
        self._extra_drafts = {}  # parked requests (not in this batch) whose draft came
        for rid, draft in drafts.items():
            if rid not in self._pending and rid in self._committed:
                self._extra_drafts[rid] = self._hand_out(rid, draft, self._committed[rid])
        if self.draft_flag is not None:
            self.draft_flag.set(bool(self._pending or self._extra_drafts or self._park_next))
        self._report_status(t0, len(req_ids))
        t3 = time.perf_counter()
        self.hub.count_many({"proxy_steps": 1,
                             "proxy_overhead_us": int(((t1 - t0) + (t3 - t2)) * 1e6)})
        self.step_cost.step_ended(t3, req_ids, sum(len(d) for d in out)
                                  + sum(len(d) for d in self._extra_drafts.values()))
        return out

    def _step_cost_now(self) -> tuple[float, float] | None:
        """(a step's time as the last one's load makes it, seconds per draft token verified):
        the fitted plain step plus the verification of the draft tokens handed out for the step
        just finished (vLLM's count; a step that verifies drafts lasts longer, so an extra token
        saves more and a late draft is fewer steps away)."""
        fit = self.step_cost.fit()
        if fit is None:
            return None
        a, c = fit
        return a + c * sum(self._verified.values()), c

    def _count_round(self, rid: str, emitted: int) -> None:
        """Moments of (draft tokens d, accepted a) per verified round, so a reader of /metrics can
        put a confidence interval on the acceptance Σa / Σd (rounds, not tokens, are the
        independent units): Σd, Σa, Σa², Σad, Σd²."""
        d = self._verified.get(rid, 0)
        if d == 0:
            return
        a = min(emitted - 1, d)
        self.hub.count_many({"verify_rounds": 1, "round_draft_tokens": d, "round_accepted": a,
                             "round_accepted_sq": a * a, "round_accepted_x_draft": a * d,
                             "round_draft_sq": d * d})

    def _hand_out(self, rid: str, draft: Draft | None, length: int) -> list[int]:
        """The draft tokens request rid (committed `length` tokens) is handed for the next step."""
        if draft is None:
            return []
        tokens = draft.tokens[: self._min_tokens_cap(rid, length)].tolist()
        self._pending[rid] = (draft, len(tokens))
        return tokens

    def take_scheduler_extras(self) -> tuple[dict[str, list[int]], list[str]]:
        """What the last propose() decided beyond its per-batch drafts, once: the drafts of
        parked requests (not in the batch) and the requests to park in the next step."""
        extras, park = self._extra_drafts, self._park_next
        self._extra_drafts, self._park_next = {}, []
        return extras, park

    def _min_tokens_cap(self, rid: str, length: int) -> int:
        """Most draft tokens request rid may be handed for the step after this one.

        NOTE: vLLM 0.32 masks stop tokens in the bonus row whenever the request has fewer than
        min_tokens outputs *before* the step, ignoring the drafts ahead of the bonus
        (docs/exactness.md note 11; tests/statistical/test_vllm_sampler_gaps.py). With L outputs
        and n drafts the bonus is output L + n, so n <= min_tokens - L - 1 keeps its mask right.
        """
        bounds = self._min_tokens.get(rid)
        if bounds is None:
            return self.max_gamma
        outputs = length - bounds[0]
        if outputs >= bounds[1]:
            del self._min_tokens[rid]
            return self.max_gamma
        return min(self.max_gamma, max(0, bounds[1] - outputs - 1))

    def _report_status(self, now: float, running: int) -> None:
        interval = self.config.status_interval_s
        if interval <= 0 or now - self._status_at < interval:
            return
        status = self.step_cost.status(running)
        if status is not None:
            self._status_at = now
            self.hub.broadcast_status(status)
            self.hub.count("status_broadcasts")

    def _commit(self, runner: Any, rid: str, i: int, sampled: list[int], num_tokens_no_spec: Any,
                token_ids_cpu: Any) -> bool:
        """Start or advance request rid with the hub. True if a draft should be collected."""
        sent = self._committed.get(rid)
        if sent is None:
            req = runner.requests[rid]
            params = req.sampling_params
            session = ((params.extra_args or {}).get(SESSION_KEY) if params is not None else None)
            prompt = list(req.prompt_token_ids or [])
            ok = bool(session) and self.hub.start_request(
                rid, str(session), prompt, request_params(params, self.max_gamma))
            if not session:
                self.hub.count("requests_without_session")
            mode = cut_mode(params)
            if ok and mode != "none":
                self._cut_mode[rid] = mode
            shuffle = (params.extra_args or {}).get(TEST_INTAKE_SHUFFLE_KEY) if ok else None
            if shuffle is not None and envs.test_switches_enabled():
                self.intake.shuffle(rid, shuffle)
            min_tokens = int(getattr(params, "min_tokens", 0) or 0)
            if ok and min_tokens > 0:
                self._min_tokens[rid] = (len(prompt), min_tokens)
            sent = len(prompt) if ok else -1
            self._committed[rid] = sent
            max_tokens = getattr(params, "max_tokens", None)
            self._max_len[rid] = len(prompt) + (max_tokens if isinstance(max_tokens, int)
                                                else 1 << 62)
        if sent < 0 or not sampled:  # unbound, or a partial prefill produced no token
            return False
        length = int(num_tokens_no_spec[i])
        if length > sent:
            self.hub.commit(rid, length, token_ids_cpu[i, sent:length].tolist(),
                            self._verified.get(rid, 0))
            self._committed[rid] = length
        # A request that reached max_tokens ends with this step: no draft to wait for.
        return length < self._max_len.get(rid, 1 << 62)

    def draft_probs(self, req_ids: list[str], metadata: Any,
                    device: torch.device) -> torch.Tensor | SparseDraftProbs:
        """q̃ for the drafts vLLM scheduled this step, in its flattened token order.

        "scatter": dense [num_draft_tokens, vocab_size] float32 for vLLM's rejection sampler;
        "fused": a SparseDraftProbs for vllm_tslt's sparse sampler (alternatives included).
        A row whose scheduled tokens are not a prefix of the draft we handed out (or whose draft is
        gone) is one-hot at the scheduled token: always lossless (DESIGN.md rule 7).
        """
        # A TP collective: every rank gets rank 0's rows (rule 9), or None on every rank when
        # building them failed there: then one-hot rows everywhere (rule 7), never a hang.
        shared = self.parallel.share_from_rank0(lambda: self._gather(req_ids, metadata),
                                                self._gather_failed)
        if shared is None or self._perturbed_for_test(req_ids):
            shared = _one_hot_rows(metadata)
        q, alternatives = shared
        if self.config.verifier == "fused":
            return SparseDraftProbs(q.indices, q.probs(), alternatives)
        if isinstance(q, FloatQ):  # a baseline wire format (benchmarks): dense on the CPU
            return q.dense(self.vocab_size).to(device)
        from vllm_tslt.kernels.dispatch import auto_scatter_sparse_q

        return auto_scatter_sparse_q(q.indices.to(device), q.counts.to(device), self.vocab_size,
                                     quant_bits=q.quant_bits)

    def _gather_failed(self, exc: BaseException) -> None:
        self._pending = {}
        self.hub.count("anomaly_draft_probs_failed")
        logger.warning("TSLT: building the q̃ rows failed (%s); this step verifies one-hot", exc,
                       exc_info=exc)

    def _perturbed_for_test(self, req_ids: list[str]) -> bool:
        """The tp_check negative control: a TP rank other than 0 ignores rank 0's q̃."""
        if self.parallel.tp_rank == 0 or not envs.test_switches_enabled():
            return False
        requests = getattr(self._runner, "requests", {})
        for rid in req_ids:
            params = getattr(requests.get(rid), "sampling_params", None)
            if (getattr(params, "extra_args", None) or {}).get(TEST_TP_PERTURB_KEY):
                return True
        return False

    def check_sampled(self, sampled_token_ids: torch.Tensor) -> None:
        """tp_check: every rank's sampled tokens this step must equal rank 0's (a TP collective,
        called by the model runner after sampling on every rank)."""
        divergent = self.parallel.check_sampled(sampled_token_ids.tolist())
        if divergent:
            self.hub.count("tp_divergent_steps")
            logger.error("TSLT tp_check: TP ranks %s sampled other tokens than rank 0 in step %d "
                         "(their q̃ or logits differ: DESIGN.md rule 9)", divergent, self._step)

    def _gather(self, req_ids: list[str],
                metadata: Any) -> tuple[SparseQ | FloatQ, torch.Tensor | None]:
        scheduled = metadata.draft_token_ids.to("cpu", torch.int64)  # [num_draft_tokens]
        parts: list[SparseQ | FloatQ] = []
        alts: list[torch.Tensor] = []  # [n, m - 1] per request
        pending = self._pending if self._pending_step == self._step - 1 else {}
        self._pending = {}
        offset = 0
        for rid, n in zip(req_ids, metadata.num_draft_tokens):
            if n == 0:
                continue
            tokens = scheduled[offset: offset + n]
            offset += n
            draft, _ = pending.get(rid, (None, 0))
            if self._cut_mode.get(rid) == "one_hot":
                # NOTE: every draft of such a request, cut or not: whether the grammar cut it
                # depends on the drafted values, so q̃ rows for uncut drafts only would be biased.
                draft = None
                self.hub.count("draft_rows_one_hot_structured", n)
            if draft is not None and draft.gamma >= n and torch.equal(draft.tokens[:n], tokens):
                parts.append(draft.q.rows(0, n))
                alts.append(draft.alternatives[:n] if draft.alternatives is not None
                            else torch.empty(n, 0, dtype=torch.int64))
                self.hub.count("draft_tokens_verified", n)
            else:
                parts.append(SparseQ.one_hot(tokens, quant_bits=1))
                alts.append(torch.empty(n, 0, dtype=torch.int64))
                self.hub.count("draft_rows_one_hot", n)
        return concat_rows(parts), _pad_alternatives(alts)


def _one_hot_rows(metadata: Any) -> tuple[SparseQ, None]:
    """Every scheduled draft token verified one-hot (rule 7): identical on every TP rank."""
    scheduled = metadata.draft_token_ids.to("cpu", torch.int64)  # [num_draft_tokens]
    return SparseQ.one_hot(scheduled, quant_bits=1), None


def _pad_alternatives(alts: list[torch.Tensor]) -> torch.Tensor | None:
    """[num_tokens, max(m) - 1] int32, -1 where a row has fewer alternatives; None if none."""
    width = max((a.shape[1] for a in alts), default=0)
    if width == 0:
        return None
    return torch.cat([torch.nn.functional.pad(a, (0, width - a.shape[1]), value=-1)
                      for a in alts]).to(torch.int32)


def _tokenizer_fingerprint(model_config: Any) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_config.tokenizer,
                                        trust_remote_code=model_config.trust_remote_code)
    return vocab_fingerprint(tok.get_vocab())
