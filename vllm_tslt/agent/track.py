"""The device's bookkeeping of one request: its draft state, what was sent for it, its branches."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_tslt.agent.branches import Branch
from vllm_tslt.agent.drafter import DraftState


@dataclass
class SentDraft:
    committed_len: int
    tokens: list[int]
    sent_at: float
    num_bytes: int


@dataclass
class Track:
    """Runtime bookkeeping of one request around its DraftState."""

    state: DraftState
    max_gamma: int
    max_len: int  # prompt + max_tokens: never draft beyond
    gamma: int = 0  # γ for the current committed sequence (0: no draft this step)
    sent: SentDraft | None = None  # the draft for the current committed sequence
    ahead: SentDraft | None = None  # a draft sent ahead for the sequence expected next
    last_commit_at: float | None = None
    keys_at_edge: set[int] = field(default_factory=set)  # committed lengths of drafts sent
    paused: bool = False  # the edge was told not to wait for drafts (speculation off)
    branches: list[Branch] = field(default_factory=list)  # for the draft in flight (`sent`)
    planned_levels: int = 0  # outcome levels planned for the draft in flight (branches.py)
    plan_inputs: tuple[float, int] = (0.0, 0)  # (α, budget) of this round's plan

    def ahead_outstanding(self) -> int:
        return sum(k > self.state.committed_len for k in self.keys_at_edge)

    def limit(self, want: int) -> int:
        """Chain length to aim for, capped by max_len."""
        return max(0, min(want, self.max_len - self.state.committed_len))
