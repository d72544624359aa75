"""The README's main command: build the built-in pair and generate with it through vLLM.

Stage 1 (foundation): the target generates through `vllm.LLM`; its greedy output is checked against
transformers' greedy decode of the same checkpoint. Later stages run the full device -> edge path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["def read_config(path):\n", "import os\n\n\nclass ", "    for key, value in "]
MAX_TOKENS = 24


def vllm_generate(model: Path, prompts: list[str], max_tokens: int, log_path: Path,
                  temperature: float = 0.0, seed: int | None = None) -> list[dict]:
    """Run `vllm-tslt generate` in a child process (vLLM logs go to log_path)."""
    cmd = [sys.executable, "-m", "vllm_tslt.cli", "generate", "--model", str(model),
           "--max-tokens", str(max_tokens), "--temperature", str(temperature)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for prompt in prompts:
        cmd += ["--prompt", prompt]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM generation failed (exit {proc.returncode}); see {log_path}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def transformers_greedy(model_dir: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def run_demo(pair: str = "tiny") -> int:
    from .cli import _pair_table
    from .models.pairs import ensure_pair

    print(f"[1/3] model pair {pair!r}: building or loading from cache")
    t0 = time.perf_counter()
    paths = ensure_pair(pair)
    print(f"      ready in {time.perf_counter() - t0:.0f} s at {paths.root}")
    print(_pair_table(paths.stats()))

    log_path = Path(tempfile.gettempdir()) / "vllm-tslt-demo-vllm.log"
    print(f"[2/3] generating with vllm.LLM on the target (engine start ~30 s; log: {log_path})")
    results = vllm_generate(paths.target, PROMPTS, MAX_TOKENS, log_path)
    *rows, summary = results
    for row in rows:
        print(f"  prompt: {row['prompt']!r}\n  answer: {row['text']!r}")
    print(f"  {summary['generated_tokens']} tokens in {summary['seconds']} s "
          f"({summary['generated_tokens'] / max(summary['seconds'], 1e-9):.0f} tok/s, batch of "
          f"{len(rows)})")

    print("[3/3] checking vLLM's greedy output against transformers' greedy decode")
    reference = transformers_greedy(paths.target, PROMPTS, MAX_TOKENS)
    same = [row["token_ids"] == ref for row, ref in zip(rows, reference)]
    print(f"  identical token ids: {sum(same)}/{len(same)} prompts")
    return 0 if all(same) else 1
