"""Structured outputs stay exact with device drafts (vLLM 0.32.0 `StructuredOutputManager`).

vLLM's scheduler replaces a request's drafts by their longest grammar-valid prefix
(`Scheduler.update_draft_token_ids` -> `StructuredOutputManager.validate_tokens`) and, at the cut,
emits a bonus token drawn from the grammar-masked target p. That is biased for drafts sampled from
a distribution q̃ (DESIGN.md rule 8): exact verification *rejects* the grammar-invalid draft token
(p = 0 there) and samples the residual norm(max(0, p - q̃)). The bonus token follows
p + q̃(invalid)·(p - residual) instead of p.

The wrapper below keeps the first grammar-invalid token x_j after the valid prefix. The scheduler
then schedules x_1..x_j; the grammar bitmask row for position j comes from the state after the
valid prefix (vLLM fills that row before it tries to advance the grammar with x_j), so the
verifier sees p(x_j) = 0 and rejects x_j against the very q̃ row it was sampled from: the emitted
token is a draw from the residual, exactly as the rejection rule prescribes.
NOTE: vLLM accepts when p/q̃ >= u with u a float64 uniform in [0, 1); u == 0 (probability 2**-53
per such position) would accept x_j. That is the only departure and it is far below any test.

vLLM logs two ERROR lines for every such position (the grammar cannot advance past x_j while it
fills the bitmask). They are expected here: a logging filter drops exactly those records, for
exactly the (request, token) pairs this wrapper appended.

This needs a grammar that refuses a token without changing its state: xgrammar (vLLM's choice
for regex, JSON schema, choice and most grammars). For other backends (guidance, outlines,
lm-format-enforcer) vLLM's cut stays and the proposer verifies every draft of such a request with
one-hot rows (`cut_mode`): exact, with lower acceptance on those requests. (One-hot rows for cut
drafts only would not be: whether a draft is cut depends on the drafted values.)

Test-only switch (negative controls and measurements, honoured only with
`VLLM_TSLT_TEST_SWITCHES=1` on the server): `vllm_xargs.tslt_test_structured_cut` = "truncate"
(vLLM's biased behaviour) or "one_hot".
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

from .patch import Patch

MANAGER = "vllm.v1.structured_output:StructuredOutputManager"
TEST_CUT_KEY = "tslt_test_structured_cut"
TEST_CUT_MODES = ("truncate", "one_hot")
# vLLM 0.32.0's messages for a draft token the grammar cannot accept while it fills the bitmask
# (vllm/v1/structured_output/__init__.py grammar_bitmask, backend_xgrammar.py accept_tokens).
EXPECTED_REJECT_MESSAGES = {
    "vllm.v1.structured_output": "Unexpected: grammar terminated or rejected draft token %s for "
                                 "request %s during bitmask fill.",
    "vllm.v1.structured_output.backend_xgrammar": "Failed to advance FSM for request %s for "
                                                  "tokens %s. Please file an issue.",
}


def cut_mode(sampling_params: Any) -> str:
    """How a structured-output request's drafts are cut and verified (both processes agree).

    "none": not a structured-output request. "reject_slot": the first grammar-invalid draft
    token is kept and verified with its own q̃ row (xgrammar: it refuses a token without changing
    its state). "one_hot": vLLM's cut, and the proposer verifies all of the request's drafts
    with one-hot rows (other backends, e.g. guidance, would enter an error state on an invalid
    token; one-hot is exact for any draft, DESIGN.md rule 7). "truncate": vLLM's biased behaviour (test-only).
    """
    from vllm_tslt import envs

    structured = getattr(sampling_params, "structured_outputs", None)
    if structured is None:
        return "none"
    if envs.test_switches_enabled():
        forced = (getattr(sampling_params, "extra_args", None) or {}).get(TEST_CUT_KEY)
        if forced in TEST_CUT_MODES:
            return forced
    return "reject_slot" if getattr(structured, "_backend", None) == "xgrammar" else "one_hot"


class ExpectedRejections(logging.Filter):
    """Drops vLLM's ERROR records about draft tokens this patch deliberately kept (bounded)."""

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def expect(self, request_id: str, token: int) -> None:
        with self._lock:
            if len(self._pending) >= self.MAX_ENTRIES:
                self._pending.pop(next(iter(self._pending)))
            self._pending[(request_id, int(token))] = len(EXPECTED_REJECT_MESSAGES)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in EXPECTED_REJECT_MESSAGES.values() or not record.args:
            return True
        args = tuple(record.args) if isinstance(record.args, tuple) else ()
        if len(args) != 2:
            return True
        key = (str(args[1]), _as_int(args[0])) if "bitmask" in str(record.msg) else \
            (str(args[0]), _as_int(args[1]))
        with self._lock:
            left = self._pending.get(key)
            if left is None:
                return True
            if left <= 1:
                del self._pending[key]
            else:
                self._pending[key] = left - 1
        return False


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


EXPECTED = ExpectedRejections()


def keep_first_invalid(proposed: list[int], validated: list[int]) -> list[int]:
    """validated + [the first token vLLM cut], when it cut one; validated otherwise."""
    n = len(validated)
    if n >= len(proposed) or proposed[n] < 0 or proposed[:n] != validated:
        return validated  # nothing cut, or vLLM stopped at its -1 padding
    return [*validated, proposed[n]]


def _uses_tslt(manager: Any) -> bool:
    config = getattr(manager, "vllm_config", None)
    return bool((getattr(config, "additional_config", None) or {}).get("tslt"))


def _wrap_validate_tokens(original):
    @functools.wraps(original)
    def validate_tokens(self, request, spec_tokens: list[int]) -> list[int]:
        validated = original(self, request, spec_tokens)
        if not _uses_tslt(self) or cut_mode(request.sampling_params) != "reject_slot":
            return validated
        kept = keep_first_invalid(list(spec_tokens), list(validated))
        if len(kept) > len(validated):
            EXPECTED.expect(request.request_id, kept[-1])
        return kept

    return validate_tokens


PATCH = Patch(MANAGER, "validate_tokens", "0.32.0", _wrap_validate_tokens)


def apply() -> bool:
    if PATCH.applied:
        return False
    PATCH.apply()
    for name in EXPECTED_REJECT_MESSAGES:
        logger = logging.getLogger(name)
        if EXPECTED not in logger.filters:
            logger.addFilter(EXPECTED)
    return True
