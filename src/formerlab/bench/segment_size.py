"""How the segment size s of ``causal_nystrom`` trades accuracy: the measurement behind
its default (``DEFAULT_SEGMENT_SIZE``).

For each sequence length N and input family, the relative error ‖out − exact‖_F/‖exact‖_F
of ``causal_nystrom_attention`` (block system) against exact causal softmax, in float64,
for several fixed s, the length-derived s = ⌈√N⌉ that the default used to be, and
local-only attention (landmarks dropped) for reference. Families: ``gaussian`` q, k
(std 1), ``sharp`` (std 2, peaked attention), ``walk`` (random walks along the sequence
normalised to unit std: smooth, local structure). Accuracy only; no timing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.attention.causal_nystrom import causal_nystrom_attention
from formerlab.attention.softmax import softmax_attention
from formerlab.errors import check_choice, check_positive_int

FAMILIES = ("gaussian", "sharp", "walk")
SIZES = (128, 512, 2048)
SEGMENTS = (8, 16, 32, 64)


def family_inputs(kind: str, n: int, d: int, heads: int = 4, seed: int = 0) -> list[Tensor]:
    """q, k, v (1, heads, n, d) float64 of input family ``kind`` (see the module doc)."""
    check_choice("kind", kind, FAMILIES)
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, heads, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    if kind == "sharp":
        q, k = 2 * q, 2 * k
    elif kind == "walk":
        q, k = (t.cumsum(2) for t in (q, k))
        q, k = (t / t.std(dim=2, keepdim=True) for t in (q, k))
    return [q, k, torch.randn(1, heads, n, d, generator=g, dtype=torch.float64)]


def local_only(q: Tensor, k: Tensor, v: Tensor, s: int) -> Tensor:
    """Exact causal attention restricted to each query's own segment of s tokens."""
    i = torch.arange(q.shape[2])
    mask = (i[None] <= i[:, None]) & (i[None] // s == i[:, None] // s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _rel(out: Tensor, ref: Tensor) -> str:
    return f"{float((out - ref).norm() / ref.norm()):.3f}"


def measure(
    sizes=SIZES, segments=SEGMENTS, families=FAMILIES, head_dim: int = 32, seed: int = 0
) -> list[dict[str, str]]:
    """One row per (N, family): relative errors for each s, ⌈√N⌉ and local only (s = 32)."""
    check_positive_int("head_dim", head_dim)
    for s in segments:
        check_positive_int("segments", s)
    rows = []
    for n in sizes:
        check_positive_int("sizes", n)
        root = max(1, math.ceil(math.sqrt(n)))
        for kind in families:
            q, k, v = family_inputs(kind, n, head_dim, seed=seed)
            ref, _ = softmax_attention(q, k, v, causal=True)

            row = {"N": str(n), "data": kind}
            for s in segments:
                row[f"s = {s}"] = _rel(causal_nystrom_attention(q, k, v, s)[0], ref)
            err = _rel(causal_nystrom_attention(q, k, v, root)[0], ref)
            row["s = ⌈√N⌉"] = f"{err} (s = {root})"
            row["local only (s = 32)"] = _rel(local_only(q, k, v, 32), ref)
            rows.append(row)
    return rows
