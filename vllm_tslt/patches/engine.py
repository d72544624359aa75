"""Engine-core hook: no draft round trip when no draft can come back (vLLM 0.32.0).

`EngineCore.post_step` asks the workers for their draft token ids after every step
(`take_draft_token_ids`: a collective RPC to the output rank, ~0.8 ms on a 2-core CPU box). With
`method: tslt` only requests bound to a device session ever get drafts, so while no running request
names a session (`vllm_xargs.tslt_session`) the answer is known to be empty and the call is
skipped. A request that names one is in `scheduler.running` from its first (prefill) step on, so
its first drafts are taken right after that step, exactly as without this hook. While requests
with a device run, the worker that owns the hub says after each ``propose()`` whether it handed
out any draft or park (vllm_tslt.patches.draft_flag); when it did not (every device paused, or
late and decoded plainly), the call is skipped too: its answer would be empty.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from .draft_flag import DraftFlagReader
from .patch import Patch

SESSION_KEY = "tslt_session"  # == vllm_tslt.edge.proposer.SESSION_KEY (no torch import here)


def any_request_has_session(requests: Iterable[Any]) -> bool:
    """True if any request's sampling params name a device session."""
    for request in requests:
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) if params is not None else None
        if extra and extra.get(SESSION_KEY):
            return True
    return False


def _wrap_post_step(original):
    @functools.wraps(original)
    def post_step(self, model_executed: bool) -> None:
        if getattr(self, "_tslt_engine", None) is None:
            from vllm_tslt import envs

            self._tslt_engine = bool((self.vllm_config.additional_config or {}).get("tslt")) \
                and envs.overhead_patches_enabled()
            self._tslt_flag = DraftFlagReader()
        if self._tslt_engine and (not any_request_has_session(self.scheduler.running)
                                  or self._tslt_flag.no_drafts()):
            return None
        return original(self, model_executed)

    return post_step


PATCH = Patch("vllm.v1.engine.core:EngineCore", "post_step", "0.32.0", _wrap_post_step)


def apply() -> bool:
    if PATCH.applied:
        return False
    PATCH.apply()
    return True
