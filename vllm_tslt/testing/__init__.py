"""Test doubles shared by the tests and the scripts (scripts/soak.py); no vLLM in here.

- `targets`: target models with known next-token probabilities (`TableTarget`, synthetic;
  `HFTarget`, a transformers causal LM).
- `engine`: `BatchEngine`, a fake engine driving the real `DraftHub` in the proposer's order and
  verifying drafts with the reference rejection samplers.
- `peers`: the device side of the wire — `Peer` (one DEALER socket, synchronous), `ScriptedPeer`
  (a thread tracking each request's committed sequence, with drafting hooks), `make_draft`.
- `devices`: scripted devices that draft honestly — `TableDevice` (from a table model) and
  `ModelDevice` (from a transformers draft model, or deliberately wrong for negative controls).
"""
