"""TSLT core: sparsify-then-sample, per-position RNG, reference verifiers, acceptance theory.

Pure torch + numpy; never imports vLLM (the device side uses it).
"""

from vllm_tslt.core.sparsify import (
    PAD_ID,
    SparseQ,
    SparsifyConfig,
    sample_from_sparse,
    sparsify,
    sparsify_then_sample,
    sparsify_with_mass,
)

__all__ = [
    "PAD_ID",
    "SparseQ",
    "SparsifyConfig",
    "sample_from_sparse",
    "sparsify",
    "sparsify_then_sample",
    "sparsify_with_mass",
]
