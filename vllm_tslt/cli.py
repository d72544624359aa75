"""`vllm-tslt` command line: build-models, demo, generate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def cmd_build_models(args: argparse.Namespace) -> int:
    from .models.pairs import ensure_pair
    from .models.stats import stats_table

    names = ["tiny", "base"] if args.pair == "all" else [args.pair]
    for name in names:
        t0 = time.perf_counter()
        paths = ensure_pair(name)
        stats = paths.stats()
        print(f"pair {name!r} ready in {time.perf_counter() - t0:.0f} s at {paths.root}")
        print(f"  target: {paths.target}\n  draft:  {paths.draft}")
        print(stats_table(stats))
        if args.json:
            print(json.dumps({k: v for k, v in stats.items() if k != "recipe"}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate with vllm.LLM (one engine) and print JSON lines: used by the demo and the tests."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, max_model_len=args.max_model_len, dtype="float32",
              enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    t0 = time.perf_counter()
    outputs = llm.generate(args.prompt, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    for out in outputs:
        print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text,
                          "token_ids": list(out.outputs[0].token_ids)}))
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"generated_tokens": n_tokens, "seconds": round(elapsed, 3)}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(pair=args.pair)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-tslt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-models", help="build (or load from cache) the built-in model pairs")
    p.add_argument("--pair", default="tiny", choices=["tiny", "base", "all"],
                   help="which pair: tiny (tests, ~1-2 min), base (demo/benchmarks, <30 min)")
    p.add_argument("--json", action="store_true", help="also print all stats as JSON")
    p.set_defaults(func=cmd_build_models)

    p = sub.add_parser("generate", help="generate with vllm.LLM; prints one JSON line per prompt")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=512)
    p.set_defaults(func=cmd_generate)

    sub.add_parser("serve", help="exactly `vllm serve ...` (also works on vllm-cpu installs)",
                   add_help=False)
    sub.add_parser("vllm", help="any `vllm ...` command, e.g. `vllm-tslt vllm bench serve ...` "
                   "(also works on vllm-cpu installs)", add_help=False)

    p = sub.add_parser("demo", help="the end-to-end demo on a built-in model pair")
    p.add_argument("--pair", default="tiny", choices=["tiny", "base"])
    p.set_defaults(func=cmd_demo)

    from .agent.cli import register_cli as register_agent_cli

    register_agent_cli(sub)
    from .edge.keys_cli import register_cli as register_keys_cli

    register_keys_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # everything after `serve` is vLLM's, --help included
        from .serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["vllm"]:  # any vLLM CLI command, e.g. `vllm-tslt vllm bench serve ...`
        from .serve import run_vllm_cli

        return run_vllm_cli(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
