"""vllm-tslt: distributed speculative decoding for vLLM with truncated sparse draft distributions.

Importing this package has no side effects and does not import vLLM or torch; the vLLM plugin
entry point is :func:`vllm_tslt.plugin.register`.
"""

__version__ = "0.1.0"
