"""AgentConfig validation, the YAML file and the `vllm-tslt agent` CLI options."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from vllm_tslt.agent.cli import build_config, register_cli
from vllm_tslt.agent.config import AgentConfig

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "configs" / "agent.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-tslt")
    register_cli(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize(("changes", "option"), [
    ({"draft_model": ""}, "draft_model (--draft-model)"),
    ({"edge": "127.0.0.1:5557"}, "edge (--edge)"),
    ({"api": "127.0.0.1:8000"}, "api (--api)"),
    ({"listen": "localhost"}, "listen (--listen)"),
    ({"listen": "127.0.0.1:70000"}, "listen (--listen)"),
    ({"top_k": 0}, "top_k (--top-k)"),
    ({"top_p": 1.5}, "top_p (--top-p)"),
    ({"quant_bits": 17}, "quant_bits (--quant-bits)"),
    ({"candidates": 0}, "candidates (--candidates)"),
    ({"num_draft_tokens": "many"}, "num_draft_tokens (--num-draft-tokens)"),
    ({"num_draft_tokens": 0}, "num_draft_tokens (--num-draft-tokens)"),
    ({"device": "tpu"}, "device"),
    ({"reconnect_initial_s": 0}, "reconnect_initial_s"),
    ({"reconnect_initial_s": 9.0}, "reconnect_max_s"),
    ({"handshake_timeout_s": float("inf")}, "handshake_timeout_s"),
    ({"proactive": "yes"}, "proactive"),
    ({"send_hwm": 0}, "send_hwm"),
])
def test_invalid_values_name_the_option(changes, option):
    with pytest.raises(ValueError, match=option.replace("(", r"\(").replace(")", r"\)")):
        AgentConfig(**{"draft_model": "m", **changes})


def test_defaults_and_numeric_gamma():
    cfg = AgentConfig(draft_model="m")
    assert cfg.adaptive and cfg.gamma_cap == cfg.max_draft_tokens
    fixed = AgentConfig(draft_model="m", num_draft_tokens="3")
    assert fixed.num_draft_tokens == 3 and not fixed.adaptive and fixed.gamma_cap == 3
    sc = cfg.sparsify_config(0.7)
    assert (sc.temperature, sc.top_k, sc.quant_bits) == (0.7, 32, 12)


def test_yaml_file_maps_one_to_one_onto_the_fields():
    data = yaml.safe_load(YAML.read_text())
    fields = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
    assert set(data) == set(fields)
    assert {k: v for k, v in data.items() if k != "draft_model"} == \
        {k: v for k, v in fields.items() if k != "draft_model"}
    cfg = AgentConfig.from_yaml(YAML, draft_model="/models/draft", top_k=None, candidates=2)
    assert cfg.draft_model == "/models/draft" and cfg.candidates == 2 and cfg.top_k == 32


def test_yaml_unknown_key_and_missing_model(tmp_path):
    bad = tmp_path / "a.yaml"
    bad.write_text("draft_model: m\ntop_kk: 3\n")
    with pytest.raises(ValueError, match="top_kk"):
        AgentConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="draft_model"):
        AgentConfig.from_yaml(YAML)


def test_cli_options_override_the_file():
    args = _parser().parse_args([
        "agent", "--config", str(YAML), "--draft-model", "d", "--edge", "tcp://10.0.0.2:6000",
        "--api", "http://10.0.0.2:8000", "--listen", "127.0.0.1:9001", "--top-k", "8",
        "--top-p", "0.9", "--quant-bits", "10", "--candidates", "3", "--num-draft-tokens", "5",
        "--no-proactive"])
    cfg = build_config(args)
    assert (cfg.draft_model, cfg.edge, cfg.api, cfg.listen) == (
        "d", "tcp://10.0.0.2:6000", "http://10.0.0.2:8000", "127.0.0.1:9001")
    assert (cfg.top_k, cfg.top_p, cfg.quant_bits, cfg.candidates, cfg.num_draft_tokens) == (
        8, 0.9, 10, 3, 5)
    assert cfg.proactive is False and cfg.send_ahead is True  # the rest from the file
    auto = build_config(_parser().parse_args(["agent", "--draft-model", "d",
                                              "--num-draft-tokens", "auto"]))
    assert auto.adaptive and auto.proactive


def test_help_explains_every_option():
    sub = _parser()._subparsers._group_actions[0].choices["agent"]
    text = sub.format_help()
    for flag in ("--draft-model", "--edge", "--api", "--listen", "--top-k", "--top-p",
                 "--quant-bits", "--candidates", "--num-draft-tokens", "--config"):
        assert flag in text
    helps = [a.help for a in sub._actions if a.option_strings and a.dest != "help"]
    assert all(h and len(h) > 15 for h in helps), helps


def test_cli_refuses_invalid_configuration_with_exit_code_2(caplog):
    from vllm_tslt.agent.cli import cmd_agent

    args = _parser().parse_args(["agent", "--draft-model", "d", "--top-p", "2"])
    assert cmd_agent(args) == 2
    assert "top_p (--top-p)" in caplog.text
