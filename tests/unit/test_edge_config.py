"""`--speculative-config` with method tslt: JSON, dotted and YAML forms, validation, rewriting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_tslt.edge.config import TsltConfig, TsltConfigError
from vllm_tslt.patches.spec_config import PROPOSER_CLASS, rewrite_tslt_options

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _serve_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return parser


def test_json_dotted_and_yaml_forms_parse_to_the_same_options():
    parser = _serve_parser()
    json_form = parser.parse_args(["serve", "m", "--speculative-config",
                                   '{"method": "tslt", "num_speculative_tokens": 4, '
                                   '"bind": "tcp://0.0.0.0:5557", "draft_deadline_ms": 50}'])
    dotted = parser.parse_args(["serve", "m", "--speculative-config.method", "tslt",
                                "--speculative-config.num_speculative_tokens", "4",
                                "--speculative-config.bind", "tcp://0.0.0.0:5557",
                                "--speculative-config.draft_deadline_ms", "50"])
    for args in (json_form, dotted):
        spec, additional = rewrite_tslt_options(dict(args.speculative_config), {})
        assert spec == {"method": "custom_class", "model": PROPOSER_CLASS,
                        "num_speculative_tokens": 4}
        assert additional["tslt"] == TsltConfig(bind="tcp://0.0.0.0:5557").to_dict()
    yaml_form = parser.parse_args(["serve", "m", "--config", str(ROOT / "configs/edge.yaml")])
    spec, additional = rewrite_tslt_options(dict(yaml_form.speculative_config), {})
    assert spec["num_speculative_tokens"] == 4 and additional["tslt"]["verifier"] == "scatter"


@pytest.mark.parametrize(("options", "names"), [
    ({"draft_deadline_ms": -1}, "speculative_config.draft_deadline_ms"),
    ({"verifier": "magic"}, "speculative_config.verifier"),
    ({"bind": "localhost:5"}, "speculative_config.bind"),
    ({"max_k": 0}, "speculative_config.max_k"),
    ({"max_candidates": "x"}, "speculative_config.max_candidates"),
    ({"deadline": 5}, "unknown speculative_config option(s) for method 'tslt': ['deadline']"),
])
def test_errors_name_the_option(options, names):
    with pytest.raises(TsltConfigError, match=re.escape(names)):
        TsltConfig.from_dict(options)


def test_rewrite_requires_gamma_and_refuses_a_draft_model():
    with pytest.raises(TsltConfigError, match="num_speculative_tokens"):
        rewrite_tslt_options({"method": "tslt"}, {})
    with pytest.raises(TsltConfigError, match=r"speculative_config\.model"):
        rewrite_tslt_options({"method": "tslt", "num_speculative_tokens": 2, "model": "x"}, {})
    with pytest.raises(TsltConfigError, match=r"rejection_sample_method.*'synthetic'"):
        rewrite_tslt_options({"method": "tslt", "num_speculative_tokens": 2,
                              "rejection_sample_method": "synthetic"}, {})
    spec, _ = rewrite_tslt_options({"method": "tslt", "num_speculative_tokens": 2,
                                    "rejection_sample_method": "standard"}, {})
    assert spec["rejection_sample_method"] == "standard"


def test_rewrite_keeps_other_additional_config():
    _, additional = rewrite_tslt_options({"method": "tslt", "num_speculative_tokens": 2},
                                         {"other_plugin": {"a": 1}})
    assert additional["other_plugin"] == {"a": 1} and "tslt" in additional


def test_security_options_validate_and_name_the_option(tmp_path):
    from vllm_tslt.edge.keys_cli import write_keypair

    public, secret = write_keypair(tmp_path, "edge")
    empty = tmp_path / "empty"
    empty.mkdir()
    for options, name in (
        ({"max_messages_per_s": 0}, "speculative_config.max_messages_per_s"),
        ({"curve_secret_key_file": str(tmp_path / "nope")}, "speculative_config.curve_secret_key_file"),
        ({"curve_secret_key_file": str(public)}, "speculative_config.curve_secret_key_file"),
        ({"curve_authorized_keys_dir": str(tmp_path)}, "speculative_config.curve_authorized_keys_dir"),
        ({"curve_secret_key_file": str(secret), "curve_authorized_keys_dir": str(empty)},
         "speculative_config.curve_authorized_keys_dir"),
    ):
        with pytest.raises(TsltConfigError, match=re.escape(name)):
            TsltConfig.from_dict(options)
    config = TsltConfig.from_dict({"curve_secret_key_file": str(secret),
                                   "curve_authorized_keys_dir": str(tmp_path),
                                   "max_messages_per_s": "500"})
    assert config.curve and config.max_messages_per_s == 500
    assert not TsltConfig().curve


def test_agent_curve_options_come_in_pairs(tmp_path):
    from vllm_tslt.agent.config import AgentConfig
    from vllm_tslt.edge.keys_cli import write_keypair

    edge_public, _ = write_keypair(tmp_path, "edge")
    _, device_secret = write_keypair(tmp_path, "device")
    with pytest.raises(ValueError, match="curve_server_key_file is required"):
        AgentConfig(draft_model="m", curve_secret_key_file=str(device_secret))
    with pytest.raises(ValueError, match=r"curve_secret_key_file: .* has no secret key"):
        AgentConfig(draft_model="m", curve_secret_key_file=str(edge_public),
                    curve_server_key_file=str(edge_public))
    with pytest.raises(ValueError, match="curve_server_key_file: cannot read"):
        AgentConfig(draft_model="m", curve_secret_key_file=str(device_secret),
                    curve_server_key_file=str(tmp_path / "missing.key"))
    ok = AgentConfig(draft_model="m", curve_secret_key_file=str(device_secret),
                     curve_server_key_file=str(edge_public))
    assert ok.curve_server_key_file.endswith("edge.key")
