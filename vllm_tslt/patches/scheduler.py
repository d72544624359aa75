"""Scheduler hook: park a request for one step while its draft is in flight (vLLM 0.32.0).

The intake policy (vllm_tslt/edge/intake.py) may leave a request out of the next step so the rest
of the batch does not wait for its late draft. vLLM 0.32's `Scheduler.schedule` already skips a
running request for a step when ``scheduler.current_step < request.next_decode_eligible_step``
(a per-request cadence used by its V2 model runner with pipeline parallelism, and by vLLM's own
`DiffusionScheduler` to skip a request for one call, exactly as here). `schedule()` advances
``current_step`` before it checks, so ``current_step + 2``, set between two steps, skips the next
call alone. The request keeps its KV blocks and its cached state in the model runner (vLLM removes
a running request that is not scheduled from the persistent batch and adds it back later, as it
does when the token budget runs out); nothing is recomputed and nothing it emits changes: parking
only delays it.

The decision is made in the worker (the proposer, at the end of a step) and reaches the engine
core with the step's drafts: `with_intake` (called by the model runner's `take_draft_token_ids`
wrapper, patches/runner.py) adds the parked requests' drafts that came in (they are not in the
batch, so vLLM's own list lacks them) and a ``tslt_park`` attribute naming the requests to park;
the `update_draft_token_ids` wrapper below applies it. A request is parked for one step per
decision and the proposer re-decides every step (bounded by
``speculative_config.intake_max_park_steps``), so a request is never starved: when no decision
arrives (an empty step, a step without the drafter), it is simply scheduled again.
"""

from __future__ import annotations

import functools
from typing import Any

from .patch import Patch

PARK_ATTR = "tslt_park"  # DraftTokenIds attribute: request ids to leave out of the next step


def with_intake(draft_token_ids: Any, extras: dict[str, list[int]], park: list[str]) -> Any:
    """`DraftTokenIds` plus the parked requests' drafts (`extras`) and the requests to park.

    NOTE: vLLM's own DraftTokenIds may hold the input batch's live req_ids list: copied, never
    appended to. With a multiprocess executor the object is pickled, attribute included."""
    if not extras and not park:
        return draft_token_ids
    from vllm.v1.outputs import DraftTokenIds

    req_ids = list(draft_token_ids.req_ids) if draft_token_ids is not None else []
    drafts = list(draft_token_ids.draft_token_ids) if draft_token_ids is not None else []
    result = DraftTokenIds([*req_ids, *extras], [*drafts, *extras.values()])
    setattr(result, PARK_ATTR, tuple(park))
    return result


def park_requests(scheduler: Any, request_ids: Any) -> int:
    """Leave these running requests out of the scheduler's next step. Returns how many."""
    parked = 0
    running = {id(r) for r in scheduler.running}
    for rid in request_ids:
        request = scheduler.requests.get(rid)
        if request is None or request.is_finished() or id(request) not in running:
            continue
        request.next_decode_eligible_step = max(request.next_decode_eligible_step,
                                                scheduler.current_step + 2)
        parked += 1
    return parked


def _wrap_update_draft_token_ids(original):
    @functools.wraps(original)
    def update_draft_token_ids(self, draft_token_ids) -> None:
        original(self, draft_token_ids)
        park = getattr(draft_token_ids, PARK_ATTR, None)
        if park:
            park_requests(self, park)

    return update_draft_token_ids


PATCH = Patch("vllm.v1.core.sched.scheduler:Scheduler", "update_draft_token_ids", "0.32.0",
              _wrap_update_draft_token_ids)


def apply() -> bool:
    if PATCH.applied:
        return False
    PATCH.apply()
    return True
