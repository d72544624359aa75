"""Random but reproducible inputs for the kernel tests (also used by scripts/gpu_check.py).

No pytest import here: the GPU check's built-in runner uses these helpers on machines without
pytest.
"""

import os
import sys

import torch

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def import_kernels():
    """`vllm_tslt.kernels` when the project is installed, else the repository's `kernels/`."""
    try:
        import vllm_tslt.kernels as kernels
    except ImportError:
        if _REPO_ROOT not in sys.path:
            sys.path.insert(0, _REPO_ROOT)
        import kernels
    return kernels


def triton_runnable(device: str) -> tuple[bool, str]:
    """Whether Triton kernels can run on `device`, and why not."""
    kernels = import_kernels()
    if not kernels.HAS_TRITON:
        return False, "triton is not installed"
    if device == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False, "Triton kernels on the CPU need TRITON_INTERPRET=1 (no CUDA device here)"
    return True, ""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sparse_rows(
    g: torch.Generator, dist: torch.Tensor, k: int, quant_bits: int, min_k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k_i truncation of each row of `dist` (k_i in [min_k, k]), quantised to integer counts.

    Returns ascending indices [rows, k] int32 (-1 padded) and counts [rows, k] int32 with every
    real count >= 1 and each row summing to 2**quant_bits.
    """
    rows, _ = dist.shape
    total = 2**quant_bits
    indices = torch.full((rows, k), -1, dtype=torch.int32)
    counts = torch.zeros((rows, k), dtype=torch.int32)
    for r in range(rows):
        k_r = int(torch.randint(min_k, k + 1, (1,), generator=g))
        top = dist[r].topk(k_r).indices.sort().values
        mass = dist[r, top] / dist[r, top].sum()
        c = (mass * (total - k_r)).floor().to(torch.int64) + 1
        c[c.argmax()] += total - int(c.sum())
        indices[r, :k_r] = top.to(torch.int32)
        counts[r, :k_r] = c.to(torch.int32)
    return indices, counts


def make_case(
    seed: int,
    num_draft_tokens: list[int],
    vocab_size: int,
    k: int,
    num_candidates: int = 1,
    *,
    greedy_frac: float = 0.3,
    quant_bits: int = 10,
    sharpness: float = 3.0,
    draft_noise: float = 0.5,
    padded_draft_frac: float = 0.05,
    fp64_noise: bool = False,
    device: str = "cpu",
) -> dict:
    """One batch of draft rows in vLLM's layout plus sparse q̃ and all the noise.

    The draft model is a perturbed copy of the target, so drafts are accepted often enough to
    reach every branch (accept, recover, alternative accepted, bonus, greedy match/mismatch).
    """
    g = torch.Generator().manual_seed(seed)
    batch_size = len(num_draft_tokens)
    num_tokens = sum(num_draft_tokens)
    logits = torch.randn(num_tokens, vocab_size, generator=g) * sharpness
    target_probs = logits.softmax(dim=-1)
    draft_dist = (logits + draft_noise * torch.randn(num_tokens, vocab_size, generator=g)).softmax(-1)
    indices, counts = sparse_rows(g, draft_dist, k, quant_bits)
    probs = counts.to(torch.float32) / float(2**quant_bits)
    # i.i.d. candidates from q̃ in draw order: [num_tokens, num_candidates]
    dense_q = torch.zeros(num_tokens, vocab_size)
    valid = indices >= 0
    rows = torch.arange(num_tokens).unsqueeze(1).expand_as(indices)
    dense_q[rows[valid], indices[valid].long()] = probs[valid]
    if num_tokens > 0:
        cands = torch.multinomial(dense_q, num_candidates, replacement=True, generator=g).int()
    else:
        cands = torch.zeros((0, num_candidates), dtype=torch.int32)
    is_greedy = torch.rand(batch_size, generator=g) < greedy_frac
    req_of_token = torch.repeat_interleave(torch.arange(batch_size),
                                           torch.tensor(num_draft_tokens, dtype=torch.int64))
    greedy_tok = is_greedy[req_of_token]
    # greedy requests draft the draft model's argmax (in S by construction)
    cands[greedy_tok, 0] = draft_dist[greedy_tok].argmax(-1).int()
    draft_token_ids = cands[:, 0].contiguous()
    padded = torch.rand(num_tokens, generator=g) < padded_draft_frac
    draft_token_ids[padded] = -1  # vLLM's padded draft id: always rejected
    alt_token_ids = None
    if num_candidates > 1:
        alt_token_ids = cands[:, 1:].contiguous()
        fewer = torch.rand(alt_token_ids.shape, generator=g) < 0.15
        alt_token_ids[fewer] = -1  # this row has fewer alternatives
    uniform_probs = torch.rand((num_tokens, num_candidates), generator=g, dtype=torch.float64)
    q = torch.empty((batch_size, vocab_size), dtype=torch.float64 if fp64_noise else torch.float32)
    q.exponential_(generator=g)
    cu = torch.tensor(num_draft_tokens, dtype=torch.int64).cumsum(0).to(torch.int32)
    case = dict(
        draft_token_ids=draft_token_ids,
        cu_num_draft_tokens=cu,
        max_spec_len=max([*num_draft_tokens, 1]),
        target_probs=target_probs,
        sparse_indices=indices,
        sparse_counts=counts,
        sparse_probs=probs,
        quant_bits=quant_bits,
        bonus_token_ids=(vocab_size + torch.arange(batch_size, dtype=torch.int32)).unsqueeze(1),
        uniform_probs=uniform_probs if num_candidates > 1 else uniform_probs[:, 0].contiguous(),
        is_greedy=is_greedy,
        q=q,
        alt_token_ids=alt_token_ids,
        vocab_size=vocab_size,
    )
    return {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in case.items()}


def sampler_args(case: dict) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the sparse samplers for a case."""
    args = (case["draft_token_ids"], case["cu_num_draft_tokens"], case["max_spec_len"],
            case["target_probs"], case["sparse_indices"], case["sparse_probs"],
            case["bonus_token_ids"], case["uniform_probs"], case["is_greedy"])
    return args, dict(q=case["q"], alt_token_ids=case["alt_token_ids"])


def dense_args(case: dict, draft_probs: torch.Tensor) -> tuple:
    """Positional arguments of the dense (vLLM-transcribed) samplers for a single-candidate case."""
    return (case["draft_token_ids"], case["cu_num_draft_tokens"], case["max_spec_len"],
            case["target_probs"], draft_probs, case["bonus_token_ids"],
            case["uniform_probs"].reshape(-1), case["is_greedy"], case["q"].reciprocal())


# Irregular batch layouts: zero-draft requests, lengths up to 5, totals that are no block multiple.
DRAFT_LAYOUTS = [
    [3, 0, 5, 1, 4, 2, 5],
    [1],
    [0, 0, 2],
    [4, 4, 4, 4, 3, 1, 0, 2, 5, 5, 1],
]
