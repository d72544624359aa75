"""`--speculative-config '{"method": "tslt", ...}'` for vLLM 0.32.0.

`SpeculativeConfig.method` is a pydantic Literal with extra keys forbidden, so we wrap
`EngineArgs.create_speculative_config`: when the method is "tslt", our options move into
`additional_config["tslt"]` (an official VllmConfig field that reaches every process), validated
here so a bad option fails at startup naming it, and vLLM sees its `custom_class` method with our
proposer class. Both the JSON and the dotted (`--speculative-config.method tslt`) forms arrive here
as the same dict.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from .patch import Patch

METHOD = "tslt"
PROPOSER_CLASS = "vllm_tslt.edge.proposer.TsltProposer"


def rewrite_tslt_options(spec: dict[str, Any], additional: dict[str, Any] | None
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a tslt speculative_config into vLLM's keys and ours. Returns (spec, additional)."""
    from vllm_tslt.edge.config import TsltConfig, TsltConfigError

    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    ours_names = {f.name for f in dataclasses.fields(TsltConfig)}
    ours = {k: spec.pop(k) for k in list(spec) if k in ours_names}
    if spec.get("model") not in (None, PROPOSER_CLASS):
        raise TsltConfigError("speculative_config.model: not used with method 'tslt' (the draft "
                              "model runs on the devices); remove it")
    if not spec.get("num_speculative_tokens"):
        raise TsltConfigError("speculative_config.num_speculative_tokens: required with method "
                              "'tslt' (the largest draft length a device may send), e.g. 4")
    if spec.get("rejection_sample_method", "standard") != "standard":
        # "synthetic" accepts drafts at fixed rates: a benchmarking mode that changes the output
        # distribution (docs/exactness.md row 25); the fused verifier would ignore it silently.
        raise TsltConfigError("speculative_config.rejection_sample_method: method 'tslt' "
                              "verifies drafts exactly; only 'standard' is allowed, got "
                              f"{spec['rejection_sample_method']!r}")
    config = TsltConfig.from_dict(ours)
    spec.update(method="custom_class", model=PROPOSER_CLASS)
    additional = {**(additional or {}), "tslt": config.to_dict()}
    return spec, additional


def _wrap(original):
    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        spec = self.speculative_config
        if isinstance(spec, dict) and spec.get("method") == METHOD:
            from vllm_tslt.edge.parallel import DP_SIZE_KEY, refuse_pipeline_parallel

            refuse_pipeline_parallel(int(target_parallel_config.pipeline_parallel_size))
            self.speculative_config, self.additional_config = rewrite_tslt_options(
                spec, self.additional_config)
            self.additional_config[DP_SIZE_KEY] = int(target_parallel_config.data_parallel_size)
            _register_metrics(self.additional_config["tslt"], target_parallel_config)
        return original(self, target_model_config, target_parallel_config)

    return create_speculative_config


def _register_metrics(options: dict[str, Any], parallel_config: Any) -> None:
    # This runs in the process that builds the engine config: the API server, which serves /metrics
    # (with DP, merged over the hubs of the engines it serves: one per DP rank).
    from vllm_tslt.edge.parallel import rank_stats_path, served_data_parallel_ranks
    from vllm_tslt.edge.stats import register_metrics

    register_metrics(*(rank_stats_path(options, rank)
                       for rank in served_data_parallel_ranks(parallel_config)))


PATCH = Patch("vllm.engine.arg_utils:EngineArgs", "create_speculative_config", "0.32.0", _wrap)


def apply() -> bool:
    if PATCH.applied:
        return False
    PATCH.apply()
    return True
