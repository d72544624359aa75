"""The soak script's logic, run for a few seconds so it cannot rot (scripts/soak.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def _load_soak():
    name = "tslt_soak_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_short_soak_loses_nothing_and_leaks_nothing(monkeypatch):
    from vllm_tslt.edge import sessions as sessions_module

    # The run lowers the hub's idle timeout (module global): restore it afterwards.
    monkeypatch.setattr(sessions_module, "SESSION_IDLE_TIMEOUT_S",
                        sessions_module.SESSION_IDLE_TIMEOUT_S)
    soak = _load_soak()
    cfg = soak.SoakConfig(devices=3, requests=2, duration_s=6.0, churn_s=2.0, idle_timeout_s=0.5,
                          progress_s=2.0)
    result = soak.run_soak(cfg)
    print(soak.markdown(result))
    r = result["requests"]
    assert r["started"] > 20 and r["lost"] == 0 and r["invalid_outputs"] == 0, r
    assert r["greedy_checked"] > 0 and r["wrong_greedy_outputs"] == 0, r
    assert result["device_sessions_opened"] >= 4, "no device churned"
    assert result["throughput"]["request_steps_with_draft"] > 0.3, result["throughput"]
    assert result["hub_counters"]["internal_errors"] == 0
    assert result["leak"]["ok"], result["leak"]
    assert result["proxy_overhead_us"]["n"] == result["draft_wait_us"]["n"] > 10
