"""The e2e tests' scripted device is vllm_tslt.testing.devices.ModelDevice (one implementation for
tests and scripts); test_edge_serve.py and test_edge_fused.py import it from here by its old name."""

from vllm_tslt.testing.devices import ModelDevice as ScriptedDevice

__all__ = ["ScriptedDevice"]
