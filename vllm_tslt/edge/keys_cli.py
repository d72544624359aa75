"""CURVE key files for the draft channel: the `vllm-tslt keys` command and the loaders the hub uses.

A keypair is two ZeroMQ certificate files written by ``zmq.auth.create_certificates``:
``NAME.key`` (public key only: give it to the other side) and ``NAME.key_secret`` (public + secret
key: keep it, mode 0600). The edge loads its ``.key_secret`` (``curve_secret_key_file``) and the
devices' ``.key`` files from ``curve_authorized_keys_dir``; a device loads its own ``.key_secret``
and the edge's ``.key`` (docs/security.md).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import zmq
import zmq.auth

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def load_public_key(path: str | os.PathLike, option: str) -> bytes:
    """The z85 public key in certificate ``path``; ValueError naming ``option`` otherwise."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{option}: cannot read a CURVE certificate from {str(path)!r}: {e}") from None
    if len(public) != 40:
        raise ValueError(f"{option}: {str(path)!r} holds no valid z85 public key")
    return public


def load_secret_certificate(path: str | os.PathLike, option: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``.key_secret`` certificate; ValueError naming ``option``."""
    public = load_public_key(path, option)
    _, secret = zmq.auth.load_certificate(path)
    if secret is None or len(secret) != 40:
        raise ValueError(f"{option}: {str(path)!r} has no secret key (give the NAME.key_secret file "
                         "written by `vllm-tslt keys`, not the public NAME.key)")
    return public, secret


def count_public_certificates(directory: str | os.PathLike, option: str) -> int:
    """Number of ``*.key`` certificates in ``directory``; ValueError naming ``option`` if unusable."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{option}: {str(directory)!r} is not a directory")
    keys = sorted(path.glob("*.key"))
    for key in keys:
        load_public_key(key, option)
    if not keys:
        raise ValueError(f"{option}: {str(directory)!r} holds no device certificates (*.key); "
                         "nobody could connect. Leave the option empty to accept any CURVE key")
    return len(keys)


def write_keypair(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) into ``out_dir``; never overwrites."""
    if not _NAME.match(name):
        raise ValueError(f"--name must match {_NAME.pattern}, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for existing in (public, secret):
        if existing.exists():
            raise ValueError(f"{existing} exists; refusing to overwrite a key (choose another --name)")
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(out, name)
    finally:
        os.umask(old_umask)
    secret.chmod(0o600)
    public.chmod(0o644)
    return public, secret


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        public, secret = write_keypair(args.out, args.name)
    except (OSError, ValueError) as e:
        print(f"error: {e}")  # a CLI command's own output, not library logging
        return 2
    print(f"public key certificate: {public}\nsecret key certificate: {secret} (keep it private)")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `keys` subcommand to the `vllm-tslt` parser."""
    p = subparsers.add_parser(
        "keys", help="write a CURVE keypair for the draft channel (edge or device)",
        description="Write NAME.key (public certificate: hand it to the other side) and "
                    "NAME.key_secret (keep it private) with zmq.auth.create_certificates. The edge "
                    "uses its NAME.key_secret as speculative_config.curve_secret_key_file and the "
                    "devices' NAME.key files in curve_authorized_keys_dir; a device uses its own "
                    "NAME.key_secret as curve_secret_key_file and the edge's NAME.key as "
                    "curve_server_key_file. See docs/security.md.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory to write into (created if missing)")
    p.add_argument("--name", required=True, help="file name stem, e.g. edge or device-17")
    p.set_defaults(func=cmd_keys)
