"""Edge side: the vLLM proposer that proxies remote drafts, and the device-facing draft hub."""
