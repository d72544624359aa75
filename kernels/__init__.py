"""Kernels for verifying sparse (truncated) draft distributions, importable without vLLM.

Installed as `vllm_tslt.kernels`; on a bare GPU box `import kernels` from the repository root.
Each kernel module holds the Triton kernel, its launch wrapper and a torch reference; the fused
sparse sampler's kernel is long enough to live apart (`sparse_rejection_triton.py`).
"""

from ._triton_compat import HAS_TRITON
from .dense_rejection import (
    PLACEHOLDER_TOKEN_ID,
    dense_rejection_sample_ref,
    dense_rejection_sample_triton,
)
from .dispatch import (
    auto_scatter_sparse_q,
    auto_scatter_sparse_q_csr,
    auto_sparse_rejection_sample,
    select_backend,
)
from .scatter import (
    counts_to_probs,
    csr_to_padded,
    scatter_sparse_q,
    scatter_sparse_q_counts,
    scatter_sparse_q_csr,
    scatter_sparse_q_ref,
    validate_sparse_q,
)
from .sparse_rejection import (
    sparse_rejection_sample,
    sparse_rejection_sample_ref,
    sparse_rejection_sample_torch,
)

__all__ = [
    "HAS_TRITON",
    "PLACEHOLDER_TOKEN_ID",
    "auto_scatter_sparse_q",
    "auto_scatter_sparse_q_csr",
    "auto_sparse_rejection_sample",
    "counts_to_probs",
    "csr_to_padded",
    "dense_rejection_sample_ref",
    "dense_rejection_sample_triton",
    "scatter_sparse_q",
    "scatter_sparse_q_counts",
    "scatter_sparse_q_csr",
    "scatter_sparse_q_ref",
    "select_backend",
    "sparse_rejection_sample",
    "sparse_rejection_sample_ref",
    "sparse_rejection_sample_torch",
    "validate_sparse_q",
]
