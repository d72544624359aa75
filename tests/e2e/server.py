"""The end-to-end tests' server helpers (shared with the demo: vllm_tslt.edge.launch)."""

from vllm_tslt.edge.launch import free_port, vllm_server
from vllm_tslt.edge.launch import scrape_metrics as metrics

__all__ = ["free_port", "metrics", "vllm_server"]
