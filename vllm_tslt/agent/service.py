"""`Agent`: the drafting runtime and the HTTP front together, run in-process or from the CLI.

    from vllm_tslt.agent import Agent, AgentConfig
    agent = Agent(AgentConfig(draft_model=..., edge="tcp://127.0.0.1:5557",
                              api="http://127.0.0.1:8000", listen="127.0.0.1:8001"))
    agent.start()                 # returns once the front listens; the session comes when it can
    agent.wait_session(30)        # optional: True once the edge accepted the handshake
    ...                           # apps use agent.front.url + "/v1"
    agent.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vllm_tslt.agent.config import AgentConfig
from vllm_tslt.agent.front import FrontServer
from vllm_tslt.agent.runtime import DraftRuntime

logger = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig, drafter: Any = None) -> None:
        self.config = config
        self.runtime = DraftRuntime(config, drafter)
        self.front = FrontServer(
            config.api, config.listen, lambda: self.runtime.session_id,
            route=lambda: self.runtime.client.edge_limits.get("data_parallel_rank"),
            connect_timeout_s=config.api_connect_timeout_s, timeout_s=config.api_timeout_s,
            max_request_bytes=config.max_request_bytes,
            max_concurrent=config.max_concurrent_requests)

    @property
    def session_id(self) -> str:
        return self.runtime.session_id

    def start(self) -> None:
        self.runtime.start()
        try:
            self.front.start()
        except BaseException:
            self.runtime.stop()
            raise

    def wait_session(self, timeout_s: float) -> bool:
        return self.runtime.wait_session(timeout_s)

    def stop(self) -> None:
        self.front.stop()
        self.runtime.stop()

    def stats(self) -> dict[str, Any]:
        return {**self.runtime.stats(), "front": dict(self.front.counters)}

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_agent(config: AgentConfig, stop: threading.Event, stats_every_s: float = 30.0) -> int:
    """Run until ``stop`` is set (the CLI sets it on SIGINT/SIGTERM). Exit code: 0 ok, 2 refused."""
    agent = Agent(config)
    agent.start()
    print_at = time.monotonic() + stats_every_s
    try:
        while not stop.wait(0.2):
            if agent.runtime.failure is not None:
                logger.error("agent stopped: %s", agent.runtime.failure)
                return 2
            if time.monotonic() >= print_at:
                print_at += stats_every_s
                s = agent.stats()
                logger.info("session=%s requests=%d drafts=%d proactive_hit_rate=%s gamma=%s",
                            s["client"]["session_id"] or "-", s["requests"], s["drafts_sent"],
                            s["proactive_hit_rate"], s["gamma"])
    finally:
        agent.stop()
    return 0
