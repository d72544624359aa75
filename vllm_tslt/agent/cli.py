"""`vllm-tslt agent` (placeholder until the agent lands)."""

from __future__ import annotations

import argparse


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `agent` subcommand to the `vllm-tslt` parser."""
    return None
