"""Chunk-wise causal prefix sums for linear (feature-map) attention.

Causal linear attention (Katharopoulos et al., 2020, "Transformers are RNNs", eq. 8-9)
needs, for every position ``i``,

    out_i = Σ_{j <= i} (q_i · k_j) v_j

with feature vectors ``q, k`` of size F and values of size E. Forming the running state
``S_i = Σ_{j <= i} k_j v_jᵀ`` for every ``i`` costs O(N·F·E) memory; the sequential RNN
form is memory-light but a Python loop over N. The chunk-wise form used here (as in the
"chunkwise parallel" formulation of Yang et al., 2024, "Gated Linear Attention") splits
the sequence into chunks of C positions:

* inside a chunk, the C×C matrix ``tril(q_c k_cᵀ)`` is applied directly;
* across chunks, only the chunk-boundary states ``S_c = Σ_{chunks < c} k_jᵀ v_j`` (an
  exclusive prefix sum over N/C chunk sums) are kept.

Memory is O(N·C + (N/C)·F·E) per head — O(N·D) for C ≈ D = F = E — instead of O(N·F·E);
time is O(N·C·(F+E) + N·F·E). Every quantity used at position ``i`` is built from
positions ``<= i`` only, so outputs are exactly causal in value and gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.errors import check_positive_int

DEFAULT_CHUNK = 64


def exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """Σ of the entries strictly before each index along ``dim`` (first entry: zeros).

    Computed by shifting an inclusive cumsum, never as ``cumsum - x``: the subtraction
    would let each entry leak into its own prefix through rounding.
    """
    dim = dim % x.dim()
    inclusive = x.cumsum(dim)
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zero, inclusive.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def causal_dot_product(q: Tensor, k: Tensor, v: Tensor, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """``out_i = Σ_{j <= i} (q_i · k_j) v_j`` for q, k (..., N, F) and v (..., N, E).

    Chunk-wise (see the module doc): memory O(N·C + (N/C)·F·E), exact causality.
    To get the normaliser Σ_{j <= i} q_i · k_j as well, append a column of ones to ``v``.
    Runs in the dtype of the inputs; callers cast delicate work to float32 first.
    """
    check_positive_int("chunk_size", chunk_size)
    if q.shape[:-1] != k.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same shape (..., N, F); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"v must be (..., N, E) with the batch and N of k; got v={tuple(v.shape)}, k={tuple(k.shape)}"
        )
    n = q.shape[-2]
    if n == 0:
        return v.new_zeros(v.shape)
    c = min(chunk_size, n)
    pad = (-n) % c
    if pad:
        # zero features on padding positions contribute nothing to any sum
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    chunks = (n + pad) // c
    lead = q.shape[:-2]
    qc = q.reshape(*lead, chunks, c, q.shape[-1])
    kc = k.reshape(*lead, chunks, c, k.shape[-1])
    vc = v.reshape(*lead, chunks, c, v.shape[-1])

    # within a chunk: exact causal product on a C×C block
    scores = qc @ kc.transpose(-1, -2)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    intra = scores.masked_fill(~causal, 0.0) @ vc

    # across chunks: state before chunk c = Σ of chunk sums kᵀv of earlier chunks
    states = exclusive_cumsum(kc.transpose(-1, -2) @ vc, dim=-3)
    inter = qc @ states

    out = (intra + inter).reshape(*lead, chunks * c, v.shape[-1])
    return out[..., :n, :]


def noncausal_dot_product(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``out_i = Σ_j (q_i · k_j) v_j = q_i · (Kᵀ V)``: O(N·F·E) time, O(F·E) extra memory."""
    return q @ (k.transpose(-1, -2) @ v)
