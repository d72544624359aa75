"""vLLM 0.32.0 CPU bug: the `expand_kernel` override never writes non-int64 outputs.

Negative control: the shipped implementation leaves a float32/int32 output untouched (so the
rejection sampler's per-token temperature/top-k are uninitialised memory). With the fix, the values
are right, through vLLM's own `expand_batch_to_tokens` dispatch path too.
"""

from __future__ import annotations

import pytest
import torch

from vllm_tslt.patches import cpu_expand
from vllm_tslt.testing.vllm_kernels import register_cpu_kernel_overrides

pytestmark = pytest.mark.unit


@pytest.fixture()
def shipped_impl():
    import vllm._custom_ops  # noqa: F401  (loads the C++ ops, as the CPU platform does)
    from vllm.utils import cpu_triton_utils

    impl = cpu_expand.PATCH.original if cpu_expand.PATCH.applied else (
        cpu_triton_utils._expand_kernel_impl)
    assert not getattr(impl, "__tslt_patch__", None)
    return impl


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_shipped_impl_drops_its_output(shipped_impl, dtype):
    """Negative control: this is the bug the fix exists for (fails if vLLM fixes it upstream)."""
    out = torch.full((6,), -1, dtype=dtype)
    src = torch.tensor([3, 5, 9], dtype=dtype)
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    shipped_impl(out, src, cu, 0, 0, MAX_NUM_TOKENS=3)
    assert out.tolist() == [-1] * 6  # nothing was written
    assert not cpu_expand.writes_non_int64_outputs(shipped_impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_fixed_impl_expands_and_replaces(dtype):
    out = torch.full((7,), -1, dtype=dtype)
    src = torch.tensor([3, 0, 9, 4], dtype=dtype)
    cu = torch.tensor([2, 5, 5, 7], dtype=torch.int32)  # request 2 has no tokens
    cpu_expand.expand_kernel_impl_fixed(out, src, cu, 0, 8, MAX_NUM_TOKENS=3)
    assert out.tolist() == [3, 3, 8, 8, 8, 4, 4]
    assert cpu_expand.writes_non_int64_outputs(cpu_expand.expand_kernel_impl_fixed)


def test_fix_reaches_vllm_rejection_sampler_dispatch():
    """After apply(), vLLM's own expand_batch_to_tokens (used for per-token temperature) is right."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    assert current_platform.is_cpu()
    try:
        assert cpu_expand.apply() or cpu_expand.PATCH.applied
        register_cpu_kernel_overrides()
        temperature = torch.tensor([0.7, 1.0, 0.3], dtype=torch.float32)
        cu = torch.tensor([2, 3, 6], dtype=torch.int32)
        got = rejection_sampler.expand_batch_to_tokens(temperature, cu, 6)
        assert got.tolist() == pytest.approx([0.7, 0.7, 1.0, 0.3, 0.3, 0.3])
        assert not cpu_expand.fix_needed()  # idempotent: nothing more to do
    finally:
        cpu_expand.PATCH.revert()


def test_a_registered_override_is_retargeted_without_scanning_modules(monkeypatch):
    """apply() after vLLM registered its overrides must not rescan sys.modules: vLLM 0.32's scan
    raises on objects that answer every attribute (llvmlite's ffi.lib once numba compiled the
    edge's draft decoder). A module holding such an object is planted to prove it."""
    import sys
    import types

    from vllm.triton_utils import dispatcher

    class AnswersEverything:
        def __getattr__(self, name):
            return AnswersEverything()

    planted = types.ModuleType("tslt_planted_unscannable")
    planted.lib = AnswersEverything()
    monkeypatch.setitem(sys.modules, planted.__name__, planted)
    host, attr = dispatcher._resolve_kernel(cpu_expand.KERNEL_NAME)
    if not isinstance(getattr(host, attr), dispatcher.KernelOverride):
        pytest.skip("vLLM registered no override for expand_kernel in this process")
    before = dispatcher._registry[cpu_expand.KERNEL_NAME]
    try:
        cpu_expand.retarget_override(cpu_expand.KERNEL_NAME, cpu_expand.expand_kernel_impl_fixed)
        wrapper = getattr(host, attr)
        assert wrapper._impl is cpu_expand.expand_kernel_impl_fixed
        out = torch.zeros(4, dtype=torch.float32)
        wrapper[1](out, torch.tensor([0.5, 2.0]), torch.tensor([1, 4], dtype=torch.int32), 0, 0,
                   MAX_NUM_TOKENS=4)
        assert out.tolist() == [0.5, 2.0, 2.0, 2.0]
    finally:
        cpu_expand.retarget_override(cpu_expand.KERNEL_NAME, before[1])
