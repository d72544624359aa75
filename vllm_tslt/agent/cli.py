"""`vllm-tslt agent`: run the draft agent on the device until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Run the device side of vllm-tslt: the draft model drafts tokens for the edge's requests over the
TSLT protocol (ZeroMQ, --edge), and a local OpenAI-compatible API (--listen) forwards the apps'
requests to the edge's vllm serve (--api), bound to this device's drafts. Point any OpenAI client at
http://LISTEN/v1. Options override the YAML file given with --config (same names, with
underscores)."""

EPILOG = """\
example:
  vllm-tslt agent --draft-model ~/.cache/vllm-tslt/models/tiny-*/draft \\
      --edge tcp://EDGE:5557 --api http://EDGE:8000 --listen 127.0.0.1:8001

exit codes: 0 stopped by a signal, 2 refused by the edge (vocabulary or protocol mismatch) or
invalid configuration."""


def _gamma(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected an int or 'auto'") from None


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `agent` subcommand to the `vllm-tslt` parser."""
    p = subparsers.add_parser("agent", help="run the device draft agent",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file with the same fields (see configs/agent.yaml)")
    p.add_argument("--draft-model", metavar="PATH_OR_ID",
                   help="draft model: a transformers checkpoint dir or hub id; its tokenizer must "
                        "equal the edge target's (checked at the handshake)")
    p.add_argument("--edge", metavar="tcp://HOST:PORT",
                   help="the edge's draft hub (TSLT protocol); default tcp://127.0.0.1:5557")
    p.add_argument("--api", metavar="http://HOST:PORT",
                   help="the edge's OpenAI API (vllm serve); default http://127.0.0.1:8000")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="where apps reach the agent's OpenAI-compatible API; default "
                        "127.0.0.1:8001")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="keep at most K draft tokens per position (sparsify-then-sample); "
                        "default 32")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="also cut the draft distribution to its top-p nucleus; default off")
    p.add_argument("--quant-bits", type=int, metavar="B",
                   help="send draft probabilities as integer masses out of 2**B (1..16); "
                        "default 12")
    p.add_argument("--candidates", type=int, metavar="M",
                   help="candidates per draft position: 1 = chain, >1 adds M-1 alternatives "
                        "(multi-candidate); default 1")
    p.add_argument("--wire-format", choices=["tslt", "dsd-fp32", "dsd-fp16", "tkslt"],
                   help="uplink format: tslt (default), or a baseline for comparisons (the edge "
                        "must list it in speculative_config.wire_formats)")
    p.add_argument("--num-draft-tokens", type=_gamma, metavar="G|auto",
                   help="draft length γ per round, or 'auto' to adapt it to the measured "
                        "acceptance, draft time and link (and pause speculation when it cannot "
                        "pay); default auto")
    p.add_argument("--branch-budget", type=_gamma, metavar="N|auto",
                   help="send-ahead branches per round for other likely verification outcomes "
                        "(0..8), or 'auto': as many as fit in half the uplink's capacity, at most 2; default "
                        "auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"],
                   help="torch device of the draft model; default auto")
    p.add_argument("--no-proactive", dest="proactive", action="store_const", const=False,
                   help="do not draft ahead while the edge verifies")
    p.set_defaults(func=cmd_agent)


def build_config(args: argparse.Namespace):
    from vllm_tslt.agent.config import AgentConfig

    overrides = {"draft_model": args.draft_model, "edge": args.edge, "api": args.api,
                 "listen": args.listen, "top_k": args.top_k, "top_p": args.top_p,
                 "quant_bits": args.quant_bits, "candidates": args.candidates,
                 "wire_format": args.wire_format,
                 "num_draft_tokens": args.num_draft_tokens, "device": args.device,
                 "proactive": args.proactive, "branch_budget": args.branch_budget}
    if args.config is not None:
        return AgentConfig.from_yaml(args.config, **overrides)
    return AgentConfig(**{k: v for k, v in overrides.items() if v is not None})


def cmd_agent(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except (ValueError, OSError) as e:
        logger.error("invalid agent configuration: %s", e)
        return 2
    from vllm_tslt.agent.service import run_agent

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return run_agent(config, stop)
