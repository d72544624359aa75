"""A device in its own process, for fault tests that kill it: ``python device_proc.py EDGE DRAFT_DIR``.

Runs the agent's real drafting loop (``DraftRuntime``, γ = 4, top-k 16) against the hub at EDGE,
prints ``SESSION <id>`` once the handshake succeeded, and runs until it is killed (or after
MAX_LIFETIME_S, so a test that dies cannot leave it behind for long).
"""

from __future__ import annotations

import os
import sys
import time

MAX_LIFETIME_S = 600


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from vllm_tslt.agent.config import AgentConfig
    from vllm_tslt.agent.drafter import Drafter
    from vllm_tslt.agent.runtime import DraftRuntime

    edge, draft_dir = sys.argv[1], sys.argv[2]
    config = AgentConfig(draft_model=draft_dir, edge=edge, num_draft_tokens=4, top_k=16,
                         device="cpu")
    runtime = DraftRuntime(config, Drafter(draft_dir, device="cpu",
                                           base=config.sparsify_config()))
    runtime.start()
    if not runtime.wait_session(60):
        print(f"FAILED {runtime.failure}", flush=True)
        sys.exit(1)
    print(f"SESSION {runtime.session_id}", flush=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < MAX_LIFETIME_S and runtime.running:
        time.sleep(0.2)
        if os.getppid() == 1:  # the test process is gone
            break
    runtime.stop()


if __name__ == "__main__":
    main()
