"""`--speculative-config '{"method": "tslt", ...}'`: our options, typed and validated.

vLLM's own keys (`num_speculative_tokens`, ...) stay with vLLM; every other key lands here. Errors
name the option as the user wrote it: `speculative_config.<name>`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VERIFIERS = ("scatter", "fused")
INTAKE_MODES = ("wait", "adaptive")  # == vllm_tslt.edge.intake.INTAKE_MODES
MAX_PARK_STEPS = 64
WIRE_FORMATS = ("tslt", "dsd-fp32", "dsd-fp16", "tkslt")  # == vllm_tslt.core.float_q.WIRE_FORMATS


class TsltConfigError(ValueError):
    pass


def _fail(name: str, msg: str) -> TsltConfigError:
    return TsltConfigError(f"speculative_config.{name}: {msg}")


@dataclass(frozen=True)
class TsltConfig:
    # ZeroMQ endpoint the draft hub binds for devices (tcp://HOST:PORT; port 0 = any free port).
    bind: str = "tcp://127.0.0.1:5557"
    # The longest an engine step waits for drafts from devices before decoding without them.
    draft_deadline_ms: float = 50.0
    # What a step does about drafts still in flight (docs/intake.md): "wait" for every one up to
    # draft_deadline_ms; "adaptive": from measured costs (step time, each device's lateness,
    # tokens per draft) wait a bounded time, park the request (left out of the next steps), or
    # decode it plainly this step.
    intake: str = "wait"
    # "adaptive": the most steps in a row a request is left out waiting for its draft (0 = never
    # park); after that it decodes plainly.
    intake_max_park_steps: int = 2
    # "scatter": sparse q -> dense draft_probs -> vLLM's rejection sampler.
    # "fused": vllm_tslt.kernels' sparse rejection sampler replaces vLLM's (no dense q).
    verifier: str = "scatter"
    max_k: int = 64  # largest support size accepted per draft position
    max_candidates: int = 4  # spine + alternatives per position
    max_sessions: int = 1024
    max_requests_per_session: int = 256
    max_payload_bytes: int = 1 << 20
    max_prompt_len: int = 1 << 20
    # Per-device message rate (token bucket, burst = one second's worth); excess is dropped.
    max_messages_per_s: int = 2000
    # CURVE authentication and encryption of the draft channel ("" = off: plain TCP, for trusted
    # networks only). The edge's NAME.key_secret certificate (`vllm-tslt keys`).
    curve_secret_key_file: str = ""
    # Directory of the device public certificates (*.key) allowed in ("" = any CURVE key).
    curve_authorized_keys_dir: str = ""
    # Draft formats the hub accepts: "tslt", plus baselines for comparisons ("dsd-fp32", "dsd-fp16":
    # the dense distribution; "tkslt": top-K fp16 values). Others are refused and counted.
    wire_formats: tuple[str, ...] = ("tslt",)
    # How often the hub tells each device the edge's step time and verification cost per draft
    # token (EdgeStatus), in seconds; 0 = never.
    status_interval_s: float = 0.25
    # Where the hub writes its counters for the API server's /metrics ("" = a temp file per port).
    stats_path: str = ""
    # Debug check with --tensor-parallel-size > 1: compare every rank's sampled tokens each step
    # (one small all-gather per step); a mismatch is logged and counted (tp_divergent_steps).
    tp_check: bool = False

    def __post_init__(self) -> None:
        if not (self.bind.startswith("tcp://") or self.bind.startswith("ipc://")):
            raise _fail("bind", f"must be tcp://HOST:PORT or ipc://PATH, got {self.bind!r}")
        if not 0 <= self.draft_deadline_ms <= 60_000:
            raise _fail("draft_deadline_ms", f"must be in [0, 60000], got {self.draft_deadline_ms}")
        if self.intake not in INTAKE_MODES:
            raise _fail("intake", f"must be one of {INTAKE_MODES}, got {self.intake!r}")
        value = self.intake_max_park_steps
        if not isinstance(value, int) or isinstance(value, bool) or \
                not 0 <= value <= MAX_PARK_STEPS:
            raise _fail("intake_max_park_steps",
                        f"must be an integer in [0, {MAX_PARK_STEPS}], got {value!r}")
        if self.verifier not in VERIFIERS:
            raise _fail("verifier", f"must be one of {VERIFIERS}, got {self.verifier!r}")
        for name, lo, hi in (("max_k", 1, 1 << 16), ("max_candidates", 1, 16),
                             ("max_sessions", 1, 1 << 20), ("max_requests_per_session", 1, 1 << 20),
                             ("max_payload_bytes", 1024, 1 << 30), ("max_prompt_len", 1, 1 << 24),
                             ("max_messages_per_s", 1, 10_000_000)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise _fail(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
        formats = self.wire_formats
        if isinstance(formats, str) or not formats or \
                not all(f in WIRE_FORMATS for f in formats):
            raise _fail("wire_formats", f"must be a non-empty list of {list(WIRE_FORMATS)}, "
                        f"got {formats!r}")
        object.__setattr__(self, "wire_formats", tuple(formats))
        if not 0 <= self.status_interval_s <= 3600:
            raise _fail("status_interval_s", f"must be in [0, 3600], got {self.status_interval_s}")
        if not isinstance(self.tp_check, bool):
            raise _fail("tp_check", f"must be true or false, got {self.tp_check!r}")
        self._check_curve()

    def _check_curve(self) -> None:
        from .keys_cli import count_public_certificates, load_secret_certificate

        for name in ("curve_secret_key_file", "curve_authorized_keys_dir"):
            if not isinstance(getattr(self, name), str):
                raise _fail(name, f"must be a path string, got {getattr(self, name)!r}")
        if self.curve_authorized_keys_dir and not self.curve_secret_key_file:
            raise _fail("curve_authorized_keys_dir", "needs speculative_config.curve_secret_key_file "
                        "(CURVE is off without the edge's own secret key)")
        try:
            if self.curve_secret_key_file:
                load_secret_certificate(self.curve_secret_key_file, "curve_secret_key_file")
            if self.curve_authorized_keys_dir:
                count_public_certificates(self.curve_authorized_keys_dir,
                                          "curve_authorized_keys_dir")
        except ValueError as e:
            raise TsltConfigError(f"speculative_config.{e}") from None

    @property
    def curve(self) -> bool:
        """True when the draft channel is authenticated and encrypted with CURVE."""
        return bool(self.curve_secret_key_file)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TsltConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise TsltConfigError(
                f"unknown speculative_config option(s) for method 'tslt': {unknown}; "
                f"valid: {sorted(fields)} plus vLLM's own (e.g. num_speculative_tokens)")
        coerced = {}
        for name, value in options.items():
            want = fields[name].type
            try:
                if want == "float" and isinstance(value, (int, float, str)):
                    value = float(value)
                elif want == "int" and isinstance(value, str):
                    value = int(value)
                elif want == "bool" and isinstance(value, str) and \
                        value.lower() in ("true", "false"):
                    value = value.lower() == "true"
            except ValueError:
                raise _fail(name, f"expected a number, got {value!r}") from None
            coerced[name] = value
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
