"""Fix for vLLM 0.32.0's CPU `expand_kernel` override (biases every non-greedy spec decode on CPU).

`vllm.utils.cpu_triton_utils._expand_kernel_impl` passes `_ensure_int64(output)` to the C++ op. For
an output that is not int64 (per-token temperature is float32, top-k int32) that is a temporary copy:
the op writes into the copy, which is dropped, so the rejection sampler reads uninitialised memory as
per-token temperature/top-k/top-p. The replacement below is dtype-agnostic pure torch.

The CPU platform registers `cpu_tl._expand_kernel_impl` (looked up at call time) as the override of
`vllm.v1.sample.rejection_sampler.expand_kernel` in `register_triton_kernel_overrides`, which every
worker calls right after loading general plugins; replacing the module attribute before that is
enough. If the override was registered already, its target is changed in place (`retarget_override`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .patch import Patch

logger = logging.getLogger(__name__)

KERNEL_NAME = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl_fixed(
    output: torch.Tensor,  # [num_tokens], any dtype: written in place
    input_val: torch.Tensor,  # [batch_size], same dtype as output
    cu_num_tokens: torch.Tensor,  # [batch_size] int, inclusive cumsum of tokens per request
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,
) -> None:
    """output[t] = input_val[request of t], with replace_from mapped to replace_to."""
    del MAX_NUM_TOKENS
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [batch_size]
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)  # [num_tokens]
    output[: expanded.numel()].copy_(expanded)


def writes_non_int64_outputs(impl) -> bool:
    """Probe: does `impl` actually fill a float32 and an int32 output?"""
    cu = torch.tensor([1, 3], dtype=torch.int32)
    for dtype, src in ((torch.float32, [0.5, 2.0]), (torch.int32, [5, 7])):
        out = torch.full((3,), -1, dtype=dtype)
        impl(out, torch.tensor(src, dtype=dtype), cu, 0, 0, MAX_NUM_TOKENS=2)
        if out.tolist() != [src[0], src[1], src[1]]:
            return False
    return True


def _replace(original):
    del original  # nothing of the shipped body is reused

    def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                           MAX_NUM_TOKENS=None):
        expand_kernel_impl_fixed(output, input_val, cu_num_tokens, replace_from, replace_to)

    return expand_kernel_impl


PATCH = Patch("vllm.utils.cpu_triton_utils", "_expand_kernel_impl", "0.32.0", _replace)


def fix_needed() -> bool:
    """True on vLLM's CPU platform when the shipped override does not write its output."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or PATCH.applied:
        return False
    try:
        import vllm._custom_ops  # noqa: F401  (loads the CPU build's C++ ops the probe calls)

        return not writes_non_int64_outputs(PATCH.resolve())
    except Exception as exc:  # the C++ op is missing or broken: replacing it is the safe choice
        logger.warning("vllm-tslt: probing %s failed (%r); replacing it", PATCH.target, exc)
        return True


def apply() -> bool:
    if not fix_needed():
        return False
    PATCH.apply()
    from vllm.triton_utils import dispatcher

    if KERNEL_NAME in dispatcher._registry:  # overrides already registered: point them at the fix
        retarget_override(KERNEL_NAME, PATCH.resolve())
    return True


def retarget_override(name: str, impl: Any) -> None:
    """Make vLLM's registered override of kernel ``name`` call ``impl``, in place.

    Every holder of the kernel already holds the same ``KernelOverride`` (vLLM rebound them when
    it registered the override), so changing its target reaches them all without a second
    ``register_kernels``, whose scan of ``sys.modules`` (vLLM 0.32 ``_rebind_kernels``) raises on
    objects that answer any attribute, e.g. llvmlite's ``ffi.lib`` once numba has compiled
    something in this process (the edge's draft decoder does)."""
    import inspect

    from vllm.triton_utils import dispatcher

    host, attr = dispatcher._resolve_kernel(name)
    wrapper = getattr(host, attr)
    if not isinstance(wrapper, dispatcher.KernelOverride):
        dispatcher.register_kernels({name: impl})  # not an override yet: vLLM's own path
        return
    original, _ = dispatcher._registry[name]
    dispatcher._registry[name] = (original, impl)
    wrapper._impl = wrapper.func = impl
    wrapper._forward_by_name = tuple(inspect.signature(impl).parameters) == wrapper.arg_names
