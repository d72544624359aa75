"""Pick the Triton kernels on a CUDA device and the vectorised torch paths elsewhere.

The choice is logged once per (operation, backend, device type). `backend="triton"` or
`backend="torch"` forces a path (the Triton one also runs on CPU tensors under
TRITON_INTERPRET=1, which is how the tests exercise it).
"""

import logging
from typing import Literal

import torch

from . import scatter as _scatter
from . import sparse_rejection as _sparse
from ._triton_compat import HAS_TRITON, interpreter_enabled

logger = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "torch"]
_logged: set[tuple[str, str, str]] = set()


def select_backend(operation: str, device: torch.device, backend: Backend = "auto") -> str:
    """'triton' on CUDA when Triton is importable, else 'torch'; logs the choice once."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    chosen = backend
    if backend == "auto":
        chosen = "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if chosen == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1")
    key = (operation, chosen, device.type)
    if key not in _logged:
        _logged.add(key)
        why = "forced" if backend != "auto" else (
            "CUDA device" if chosen == "triton" else
            "no CUDA device" if HAS_TRITON else "triton not installed")
        logger.info("vllm_tslt kernels: %s uses the %s path on %s (%s)", operation, chosen,
                    device.type, why)
    return chosen


def auto_scatter_sparse_q(
    # [num_tokens, k] int32, ascending, -1 padded
    indices: torch.Tensor,
    # [num_tokens, k] float32 probs, or integer counts when quant_bits is given
    values: torch.Tensor,
    vocab_size: int,
    *,
    quant_bits: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dense `[num_tokens, vocab_size]` float32 q̃ from padded sparse q̃."""
    if select_backend("scatter_sparse_q", indices.device, backend) == "triton":
        return _scatter.scatter_sparse_q(indices, values, vocab_size, quant_bits=quant_bits)
    probs = values if quant_bits is None else _scatter.counts_to_probs(values, quant_bits)
    return _scatter.scatter_sparse_q_ref(indices, probs, vocab_size)


def auto_scatter_sparse_q_csr(
    cu_offsets: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    vocab_size: int,
    *,
    quant_bits: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dense `[num_tokens, vocab_size]` float32 q̃ from CSR sparse q̃."""
    if select_backend("scatter_sparse_q_csr", indices.device, backend) == "triton":
        return _scatter.scatter_sparse_q_csr(cu_offsets, indices, values, vocab_size,
                                             quant_bits=quant_bits)
    probs = values if quant_bits is None else _scatter.counts_to_probs(values, quant_bits)
    padded_indices, padded_probs = _scatter.csr_to_padded(cu_offsets, indices, probs)
    return _scatter.scatter_sparse_q_ref(padded_indices, padded_probs, vocab_size)


def auto_sparse_rejection_sample(*args, backend: Backend = "auto", **kwargs) -> torch.Tensor:
    """`sparse_rejection_sample` (same arguments) on the Triton or the vectorised torch path."""
    target_probs = args[3] if len(args) > 3 else kwargs["target_probs"]
    if select_backend("sparse_rejection_sample", target_probs.device, backend) == "triton":
        return _sparse.sparse_rejection_sample(*args, **kwargs)
    kwargs.pop("block_size", None)
    kwargs.pop("num_warps", None)
    return _sparse.sparse_rejection_sample_torch(*args, **kwargs)
