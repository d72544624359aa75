"""`AgentConfig`: every setting of the draft agent, validated where it is built.

`configs/agent.yaml` maps one-to-one onto these fields; CLI options override the file. Errors name
the option to change (the YAML key; the CLI flag is the same with dashes).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_tslt.core.float_q import WIRE_FORMATS
from vllm_tslt.core.sparsify import MAX_QUANT_BITS, SparsifyConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_host_port(value: str, option: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); raises ValueError naming ``option``."""
    m = _HOSTPORT.match(value or "")
    if not m or not 0 <= int(m["port"]) < 65536:  # port 0: any free port
        raise ValueError(f"{option} must be HOST:PORT (e.g. 127.0.0.1:8001), got {value!r}")
    return m["host"].strip("[]"), int(m["port"])


@dataclass
class AgentConfig:
    """The agent's settings. See configs/agent.yaml for what each field does."""

    draft_model: str = ""  # HF checkpoint dir or hub id of the draft model
    edge: str = "tcp://127.0.0.1:5557"  # the edge draft hub (ZeroMQ ROUTER)
    api: str = "http://127.0.0.1:8000"  # the edge's OpenAI API (vllm serve)
    listen: str = "127.0.0.1:8001"  # where the local OpenAI-compatible front listens
    # Sparsify-then-sample (the request's own temperature/top-k/top-p apply on top).
    top_k: int | None = 32
    top_p: float | None = None
    quant_bits: int = 12
    k_max: int = 64
    candidates: int = 1  # m: 1 = chain drafting; > 1 adds m - 1 i.i.d. alternatives per position
    # Uplink format: "tslt", or a baseline for comparisons ("dsd-fp32", "dsd-fp16": the dense
    # distribution; "tkslt": top_k fp16 values). The edge must list it in its wire_formats.
    wire_format: str = "tslt"
    num_draft_tokens: int | str = "auto"  # γ, or "auto" (adaptive draft length)
    max_draft_tokens: int = 8  # upper bound for "auto" (the edge's max_gamma caps it too)
    proactive: bool = True  # keep drafting the expected continuation while the edge verifies
    send_ahead: bool = True  # send that continuation at once, tagged with the expected sequence
    # Send-ahead branches per round for other likely outcomes (rejected at j + a guessed
    # correction, all accepted + another bonus guess): an int in 0..8, or "auto" (as many as fit
    # in half the uplink's capacity per round, at most 2). Needs send_ahead.
    branch_budget: int | str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    # Transport.
    handshake_timeout_s: float = 3.0
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 5.0
    silence_timeout_s: float = 10.0  # no message while drafts are outstanding -> handshake again
    send_hwm: int = 256  # bounded ZeroMQ queues (messages)
    recv_hwm: int = 1024
    # CURVE (both or neither; "" = plain TCP, trusted networks only): this device's NAME.key_secret
    # and the edge's public NAME.key, written by `vllm-tslt keys`.
    curve_secret_key_file: str = ""
    curve_server_key_file: str = ""
    # Adaptive draft length.
    probe_interval_s: float = 2.0  # while speculation is off, try one round this often
    min_speedup: float = 1.05  # speculate only if the model predicts at least this speedup
    # Local front.
    api_connect_timeout_s: float = 5.0
    api_timeout_s: float = 600.0  # whole request (non-streaming) / between chunks (streaming)
    max_concurrent_requests: int = 64
    max_request_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        self._check_endpoints()
        self._check_sampling()
        self._check_draft_length()
        self._check_branch_budget()
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("proactive", "send_ahead"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("handshake_timeout_s", "reconnect_initial_s", "reconnect_max_s",
                     "silence_timeout_s", "probe_interval_s", "api_connect_timeout_s",
                     "api_timeout_s"):
            value = getattr(self, name)
            if not _is_num(value) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s, got "
                             f"{self.reconnect_max_s} < {self.reconnect_initial_s}")
        if not _is_num(self.min_speedup) or not 0 < self.min_speedup < 100:
            raise ValueError(f"min_speedup must be a number in (0, 100), got {self.min_speedup!r}")
        for name in ("send_hwm", "recv_hwm", "max_concurrent_requests", "max_request_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def _check_endpoints(self) -> None:
        if not isinstance(self.draft_model, str) or not self.draft_model:
            raise ValueError("draft_model (--draft-model) is required: a checkpoint dir or hub id")
        if not isinstance(self.edge, str) or not re.match(r"^tcp://.+:\d+$", self.edge):
            raise ValueError(f"edge (--edge) must be tcp://HOST:PORT, got {self.edge!r}")
        if not isinstance(self.api, str) or not re.match(r"^https?://[^/]+", self.api):
            raise ValueError(f"api (--api) must be http://HOST:PORT, got {self.api!r}")
        parse_host_port(self.listen, "listen (--listen)")
        secret, server = self.curve_secret_key_file, self.curve_server_key_file
        if not isinstance(secret, str) or not isinstance(server, str):
            raise ValueError("curve_secret_key_file and curve_server_key_file must be paths")
        if bool(secret) != bool(server):
            missing = "curve_server_key_file" if secret else "curve_secret_key_file"
            raise ValueError(f"{missing} is required when the other CURVE key file is set "
                             "(CURVE needs this device's secret key and the edge's public key)")
        if secret:
            from vllm_tslt.agent.client import load_curve_keys

            load_curve_keys(secret, server)

    def _check_sampling(self) -> None:
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k (--top-k) must be an int >= 1 or null, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (not _is_num(p) or not 0 < p <= 1):
            raise ValueError(f"top_p (--top-p) must be in (0, 1] or null, got {p!r}")
        b = self.quant_bits
        if not _is_int(b) or not 1 <= b <= MAX_QUANT_BITS:
            raise ValueError(f"quant_bits (--quant-bits) must be an int in 1..{MAX_QUANT_BITS}, got {b!r}")
        if not _is_int(self.k_max) or self.k_max < 1:
            raise ValueError(f"k_max must be an int >= 1, got {self.k_max!r}")
        if not _is_int(self.candidates) or not 1 <= self.candidates <= 16:
            raise ValueError(f"candidates (--candidates) must be an int in 1..16, got {self.candidates!r}")
        if self.wire_format not in WIRE_FORMATS:
            raise ValueError(f"wire_format (--wire-format) must be one of {WIRE_FORMATS}, "
                             f"got {self.wire_format!r}")
        if self.wire_format != "tslt" and self.candidates != 1:
            raise ValueError(f"candidates (--candidates) must be 1 with wire_format "
                             f"{self.wire_format!r} (the baseline formats carry no alternatives)")
        if self.wire_format == "tkslt" and self.top_k is None:
            raise ValueError("top_k (--top-k) is required with wire_format 'tkslt' (its K)")

    def _check_branch_budget(self) -> None:
        from vllm_tslt.agent.branches import MAX_BRANCH_BUDGET

        b = self.branch_budget
        if isinstance(b, str) and b.isdigit():
            b = self.branch_budget = int(b)
        if b != "auto" and (not _is_int(b) or not 0 <= b <= MAX_BRANCH_BUDGET):
            raise ValueError(f"branch_budget (--branch-budget) must be 'auto' or an int in "
                             f"0..{MAX_BRANCH_BUDGET}, got {b!r}")

    def _check_draft_length(self) -> None:
        if not _is_int(self.max_draft_tokens) or not 1 <= self.max_draft_tokens <= 64:
            raise ValueError(f"max_draft_tokens must be an int in 1..64, got {self.max_draft_tokens!r}")
        g = self.num_draft_tokens
        if isinstance(g, str) and g.isdigit():
            g = self.num_draft_tokens = int(g)
        if g != "auto" and (not _is_int(g) or not 1 <= g <= 64):
            raise ValueError(f"num_draft_tokens (--num-draft-tokens) must be 'auto' or an int in "
                             f"1..64, got {g!r}")

    @property
    def adaptive(self) -> bool:
        return self.num_draft_tokens == "auto"

    @property
    def gamma_cap(self) -> int:
        """Largest γ the agent itself allows (the edge's max_gamma may lower it)."""
        return self.max_draft_tokens if self.adaptive else int(self.num_draft_tokens)

    def sparsify_config(self, temperature: float = 1.0) -> SparsifyConfig:
        """The agent's truncation at a given temperature (requests narrow it further)."""
        return SparsifyConfig(temperature=temperature, top_k=self.top_k, top_p=self.top_p,
                              k_max=self.k_max, quant_bits=self.quant_bits)

    def replace(self, **changes: Any) -> AgentConfig:
        """A validated copy with ``changes`` (None values are ignored: unset CLI options)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AgentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> AgentConfig:
        """Load a YAML file whose keys are the field names; ``overrides`` (non-None) win."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))
