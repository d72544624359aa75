"""The device side installs and imports without vLLM (extra `device`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DEVICE_MODULES = [
    "vllm_tslt", "vllm_tslt.agent", "vllm_tslt.core", "vllm_tslt.protocol",
    "vllm_tslt.models.pairs", "vllm_tslt.kernels",
]


def test_device_extra_declares_no_vllm():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["device"]
    assert not [d for d in deps if d.lower().startswith("vllm")], deps


def test_device_modules_import_with_vllm_hidden():
    # A meta-path finder makes `import vllm` fail exactly as on a device without vLLM installed.
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, sys
        class HideVLLM(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by test)")
                return None
        sys.meta_path.insert(0, HideVLLM())
        try:
            import vllm
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("vllm was importable: the hiding finder did not work")
        for name in {DEVICE_MODULES!r}:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
        assert not leaked, leaked
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
