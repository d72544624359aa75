"""Send-ahead branches: hit rate, tokens per engine step and uplink cost by branch budget.

    python scripts/bench_branches.py [--budgets 0 1 2 4 8] [--repeats 3] [--out docs/benchmarks/branches]

What runs (one process, no vLLM): the real device agent loop (``DraftRuntime``, its own thread, the
tiny pair's draft model, γ fixed) talks to the real ``DraftHub`` on loopback through an
``EmulatedLink`` (10 Mbit/s both ways, RTT = 2 × the fake engine's measured plain step); the fake
engine (``vllm_tslt.testing.engine.BatchEngine``: collect, verify with the reference rejection
sampler, commit) runs the tiny pair's target (``HFTarget``) at temperature 1 plus an emulated
``--step-ms`` per step (a bigger target). Budgets run interleaved, ``--repeats`` rounds each.

Reported per budget (JSON + a markdown table in --out):

- **hit rate**: engine steps whose draft for the committed prefix was already waiting at the hub
  when the step began collecting (sent ahead: the main chain's or a branch), over all steps;
- tokens per engine step; uplink wire bytes (the emulated link's count: framing and TCP headers
  included) per emitted token; the device's branch counters (sent, hits, misses, bytes) and the
  hub's (``drafts_ahead*``); the number of engine steps (rounds) behind each figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = ["def parse(text):\n    ", "import os\n\nclass Config:\n", "for i in range(",
           "The quick brown fox", "if __name__ == '__main__':\n"]


def build(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from vllm_tslt.agent.drafter import Drafter
    from vllm_tslt.core.sparsify import SparsifyConfig
    from vllm_tslt.models.pairs import ensure_pair
    from vllm_tslt.testing.targets import HFTarget

    pair = ensure_pair("tiny")
    drafter = Drafter(str(pair.draft), device="cpu", base=SparsifyConfig(top_k=args.top_k))
    target = HFTarget(AutoModelForCausalLM.from_pretrained(pair.target))
    prompts = [drafter.tokenizer(p)["input_ids"] for p in PROMPTS]
    return {"drafter": drafter, "target": target, "prompts": prompts}


def plain_step_ms(models: dict[str, Any], step_ms: float) -> float:
    """Median time of the fake engine's step without drafts (target forward + emulated step)."""
    target, prompt = models["target"], models["prompts"][0]
    times = []
    for i in range(12):
        t0 = time.perf_counter()
        target.probs(prompt + [5] * (i * 4), 1)
        time.sleep(step_ms / 1e3)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def run_budget(models: dict[str, Any], args: argparse.Namespace, budget: int, plain_ms: float,
               seed: int) -> dict[str, Any]:
    from vllm_tslt.agent.config import AgentConfig
    from vllm_tslt.agent.link import EmulatedLink, LinkSpec
    from vllm_tslt.agent.runtime import DraftRuntime
    from vllm_tslt.edge.config import TsltConfig
    from vllm_tslt.edge.hub import DraftHub
    from vllm_tslt.protocol import EdgeStatus
    from vllm_tslt.testing.engine import BatchEngine, Job

    drafter = models["drafter"]
    rtt_ms = 2 * plain_ms
    hub = DraftHub(TsltConfig(bind="tcp://127.0.0.1:0", draft_deadline_ms=args.deadline_ms),
                   vocab_size=drafter.vocab_size, vocab_fingerprint=drafter.fingerprint(),
                   model_name="tiny-target", max_gamma=args.gamma).start()
    link = EmulatedLink(LinkSpec(args.mbps, args.mbps, rtt_ms))
    cfg = AgentConfig(draft_model="unused", edge=hub.endpoint, num_draft_tokens=args.gamma,
                      branch_budget=budget, top_k=args.top_k)
    runtime = DraftRuntime(cfg, drafter, link=link)
    waiting = {"steps": 0, "hits": 0}
    collect = hub.collect

    def peeking_collect(request_ids, deadline_s, *a, **kw):
        table = hub.table
        with table.cond:  # was the draft for the committed prefix already here?
            for rid in request_ids:
                expected = table._expected_locked(rid)
                if expected is None:
                    continue
                draft = table.requests[rid].drafts.get(expected[0])
                waiting["steps"] += 1
                waiting["hits"] += int(draft is not None and draft.prefix_hash == expected[1])
        return collect(request_ids, deadline_s, *a, **kw)

    hub.collect = peeking_collect  # type: ignore[method-assign]
    runtime.start()
    try:
        if not runtime.wait_session(10):
            raise RuntimeError(f"no session: {runtime.failure}")
        engine = BatchEngine(hub, models["target"], deadline_s=args.deadline_ms / 1e3,
                             seed=seed, step_s=args.step_ms / 1e3)
        jobs = [Job(f"b{budget}-{seed}-{i}", runtime.session_id, models["prompts"][i],
                    args.max_tokens, temperature=1.0) for i in range(len(models["prompts"]))]
        status = EdgeStatus(step_ms=plain_ms, draft_token_ms=0.0, running=1)

        def report_status(step: int) -> None:  # as the proposer does every status_interval_s
            if step % 10 == 1:
                hub.broadcast_status(status)

        t0 = time.perf_counter()
        outputs = engine.run(jobs, on_step=report_status)
        wall = time.perf_counter() - t0
        time.sleep(0.1)
        stats, snap = runtime.stats(), hub.snapshot()
    finally:
        runtime.stop()
        hub.close()
    tokens = sum(len(o) for o in outputs.values())
    keys = ("branches_sent", "branch_hits", "branch_misses", "branch_bytes", "branch_rounds",
            "ahead_sent", "ahead_hits", "drafts_sent", "rounds", "accepted_tokens",
            "draft_tokens_sent", "branch_adopted_unsent")
    return {"budget": budget, "seed": seed, "tokens": tokens, "engine_steps": engine.stats.steps,
            "steps_observed": waiting["steps"], "waiting_hits": waiting["hits"],
            "drafted_steps": sum(engine.stats.drafted.values()),
            "uplink_wire_bytes": link.up.wire_bytes, "wall_s": wall,
            "device": {k: stats[k] for k in keys},
            "wait_us": snap.get("wait_us", 0),
            "hub": {k: v for k, v in snap.items() if k.startswith("drafts_")}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = sum(r["steps_observed"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    dev = {k: sum(r["device"][k] for r in runs) for k in runs[0]["device"]}
    hub = {k: sum(r["hub"].get(k, 0) for r in runs) for k in
           ("drafts_ahead", "drafts_ahead_hits", "drafts_ahead_misses", "drafts_ahead_bytes")}
    per_run = [r["waiting_hits"] / max(r["steps_observed"], 1) for r in runs]
    return {"budget": runs[0]["budget"], "runs": len(runs), "rounds": steps,
            "hit_rate": sum(r["waiting_hits"] for r in runs) / max(steps, 1),
            "hit_rate_range": [min(per_run), max(per_run)],
            "tokens_per_step": tokens / max(sum(r["engine_steps"] for r in runs), 1),
            "uplink_bytes_per_token": sum(r["uplink_wire_bytes"] for r in runs) / max(tokens, 1),
            "branch_bytes_per_token": dev["branch_bytes"] / max(tokens, 1),
            "tokens_per_s": tokens / sum(r["wall_s"] for r in runs),
            "wait_ms_per_step": sum(r["wait_us"] for r in runs) / 1e3 / max(steps, 1),
            "device": dev, "hub": hub}


NOTES = """## Reading it

- The engine here always waits for its draft (deadline 200 ms, `intake: wait`), so *tokens per
  engine step* follows the acceptance and stays flat across budgets; what branches buy shows in
  the *hit rate* and the *wait per step*. With the adaptive intake (docs/intake.md) a step that
  finds no draft waiting decodes plainly or parks the request instead of waiting.
- *Branch hits / sent* counts commits that matched a branch the device had sent; most of those
  branches reached the hub after the commit did (they still shortened the wait). What keeps them
  late on this box: one batched extension of the chain plus B branches costs ~3× a single one
  (CPU, tiny model: per-call overhead), the branches need γ' extensions before they leave
  (γ' = what the device drafts while the edge verifies, `GammaController.branch_gamma`), and the
  emulated link takes in and hands over frames only between the device loop's forward passes
  (`EdgeClient.poll`; a real network moves them while the device computes), which adds up to an
  extension or two to every message, both ways.
- A miss costs uplink bytes only: *of which branches* is the branches' share of the bytes per
  emitted token (TSLT drafts of γ' ≤ 3 tokens, top-k 16, framing and TCP headers included).
"""


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Send-ahead branches: hit rate by branch budget",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"One device (`DraftRuntime`, tiny pair, γ = {meta['gamma']}, top-k {meta['top_k']}, "
        f"temperature 1) and the real `DraftHub` with the fake engine (`BatchEngine` + "
        f"`HFTarget`), {meta['mbps']:g} Mbit/s emulated link, RTT {meta['rtt_ms']:.1f} ms = 2 × "
        f"the fake engine's plain step ({meta['plain_step_ms']:.1f} ms, of which "
        f"{meta['step_ms']:g} ms emulated), engine deadline {meta['deadline_ms']:g} ms; "
        f"{meta['repeats']} interleaved runs per budget, {meta['max_tokens']} tokens × "
        f"{meta['prompts']} prompts each. Machine: {meta['machine']}.",
        "",
        "*hit rate*: engine steps whose draft for the committed prefix was already waiting at "
        "the hub when the step began (sent ahead by the main chain or a branch); *rounds*: the "
        "engine steps behind the figure (all runs); uplink bytes are the link's wire bytes "
        "(framing and TCP headers included) per emitted token; *wait*: the engine's mean wait "
        "for drafts per step (the hub's `wait_us`); *branch hits*: commits that matched a sent "
        "branch (the device's count, whether or not the branch reached the edge before the "
        "step began).",
        "",
        "| branch budget | hit rate (range over runs) | tokens / engine step | wait ms / step "
        "| uplink B / token | of which branches | branch hits / sent | rounds |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in summary:
        d = s["device"]
        lo, hi = s["hit_rate_range"]
        lines.append(
            f"| {s['budget']} | {s['hit_rate']:.2f} ({lo:.2f}–{hi:.2f}) | "
            f"{s['tokens_per_step']:.2f} | {s['wait_ms_per_step']:.1f} | "
            f"{s['uplink_bytes_per_token']:.0f} | "
            f"{s['branch_bytes_per_token']:.0f} | {d['branch_hits']} / {d['branches_sent']} | "
            f"{s['rounds']} |")
    lines += ["", "Per-budget device and hub counters: `results.json`.", "", NOTES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--step-ms", type=float, default=15.0, help="emulated extra time per step")
    p.add_argument("--deadline-ms", type=float, default=200.0)
    p.add_argument("--mbps", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/branches"))
    p.add_argument("--report-only", action="store_true",
                   help="re-render report.md from --out/results.json without running")
    args = p.parse_args(argv)
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        (args.out / "report.md").write_text(markdown(saved["summary"], saved["meta"]))
        return 0
    torch.set_num_threads(1)
    models = build(args)
    plain = plain_step_ms(models, args.step_ms)
    rtt = 2 * plain
    print(f"plain step {plain:.1f} ms -> RTT {rtt:.1f} ms", flush=True)
    runs: dict[int, list[dict[str, Any]]] = {b: [] for b in args.budgets}
    for rep in range(args.repeats):
        for budget in args.budgets:  # interleaved: the machine's swings hit every budget alike
            r = run_budget(models, args, budget, plain, seed=1000 + rep)
            runs[budget].append(r)
            print(f"budget {budget} run {rep}: hit {r['waiting_hits']}/{r['steps_observed']} "
                  f"tokens {r['tokens']} steps {r['engine_steps']} {r['wall_s']:.1f}s "
                  f"branches sent {r['device']['branches_sent']} hits {r['device']['branch_hits']}",
                  flush=True)
    summary = [summarise(runs[b]) for b in args.budgets]
    meta = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "gamma": args.gamma, "top_k": args.top_k, "mbps": args.mbps, "rtt_ms": rtt,
            "plain_step_ms": plain, "step_ms": args.step_ms, "deadline_ms": args.deadline_ms,
            "repeats": args.repeats, "max_tokens": args.max_tokens, "prompts": len(PROMPTS),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared 2-core box"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": runs}, indent=1))
    (args.out / "report.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
