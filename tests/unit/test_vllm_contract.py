"""Contract tests: every vLLM symbol vllm-tslt calls or patches, checked in one place.

A vLLM upgrade that moves or changes one of these fails here, loudly, instead of deep in a run.
Add a test here whenever new code touches a vLLM symbol.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

pytestmark = pytest.mark.unit


def test_vllm_version_attribute():
    import vllm

    assert isinstance(vllm.__version__, str)
    assert vllm.__version__.split("+")[0] == "0.32.0"


def test_llm_generate_signature():
    from vllm import LLM

    params = inspect.signature(LLM.__init__).parameters
    for name in ("model", "dtype", "enforce_eager", "seed", "kwargs"):
        assert name in params, f"vllm.LLM.__init__ lost {name!r}"
    # LLM(**kwargs) forwards the rest to EngineArgs
    from vllm.engine.arg_utils import EngineArgs

    assert "max_model_len" in {f.name for f in dataclasses.fields(EngineArgs)}
    gen = inspect.signature(LLM.generate).parameters
    assert "use_tqdm" in gen


def test_sampling_params_fields():
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=3, temperature=0.5, seed=7, extra_args={"tslt_session": "s"})
    assert (sp.max_tokens, sp.temperature, sp.seed) == (3, 0.5, 7)
    assert sp.extra_args == {"tslt_session": "s"}


# --- patches/cpu_expand.py -------------------------------------------------------------------


def test_cpu_expand_patch_targets_exist():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.triton_utils import dispatcher
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample import rejection_sampler

    assert callable(cpu_triton_utils._expand_kernel_impl)
    params = list(inspect.signature(cpu_triton_utils._expand_kernel_impl).parameters)
    assert params == ["output", "input_val", "cu_num_tokens", "replace_from", "replace_to",
                      "MAX_NUM_TOKENS"]
    assert callable(dispatcher.register_kernels) and isinstance(dispatcher._registry, dict)
    assert callable(CpuPlatform.register_triton_kernel_overrides)
    assert hasattr(rejection_sampler, "expand_kernel")
    sig = inspect.signature(rejection_sampler.expand_batch_to_tokens).parameters
    assert list(sig)[:3] == ["x", "cu_num_tokens", "num_tokens"]


def test_plugins_load_before_kernel_overrides_in_workers():
    """The fix relies on this order in WorkerWrapperBase (general plugins, then CPU overrides)."""
    from vllm.v1.worker import worker_base

    src = inspect.getsource(worker_base)
    plugins_at = src.index("load_general_plugins()")
    overrides_at = src.index("register_triton_kernel_overrides()")
    assert plugins_at < overrides_at
