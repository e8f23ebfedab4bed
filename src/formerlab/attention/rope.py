"""Rotary position embeddings (RoPE): rotate q and k by their absolute positions.

Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", eq.
(13)-(15): the features of a head are taken in pairs (x_{2i}, x_{2i+1}); at position m
the pair is rotated by the angle m·θ_i with θ_i = base^(-2i/D). As a complex number
z_i = x_{2i} + i·x_{2i+1} this is z_i · e^{i m θ_i}, so for a query at m and a key at n

    Re Σ_i (q_i e^{i m θ_i}) · conj(k_i e^{i n θ_i}) = Re Σ_i q_i conj(k_i) e^{i (m - n) θ_i}:

the score depends on the positions only through m - n (relative positions), and the
rotation keeps every norm. Positions are absolute token indices, so a prefix is rotated
as in the whole sequence (prefix consistent) and a streaming step passes the position of
its first token (``positions=start``).

Where rope goes for each kernel (applied to q and k *before* the kernel, every kernel):

* ``softmax`` and ``causal_nystrom``: every score is exp(scale·q'·k') of rotated q', k'
  (landmarks are means of rotated vectors, and a common shift of all positions rotates
  them alike), so outputs depend on relative positions only, exactly.
* ``performer``: its random features estimate exp(q'·k') of the rotated vectors: an
  unbiased estimate of rotary softmax attention, relative in expectation.
* ``linear`` (φ = elu+1, ...): φ(R_m q)·φ(R_n k) stays >= 0, so the normaliser stays
  positive and every output remains a convex combination of values: the kernel stays
  valid, but the score is no longer a function of m - n alone. RoFormer's linear variant
  (their sec. 3.4.3) instead rotates φ(q), φ(k) in the numerator only: that keeps relative
  positions but gives weights that can be negative and do not sum to one (the numerator
  no longer matches its normaliser), so it is not used here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerlab.linalg.numerics import compute_dtype


def _positions(positions: int | Tensor, b: int, n: int, device: torch.device) -> Tensor:
    """(B or 1, 1, N) float64 positions from a start offset or a (N,) / (B, N) tensor."""
    if isinstance(positions, Tensor):
        if positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"positions must be a real tensor; got dtype {positions.dtype}")
        ok = tuple(positions.shape) in ((n,), (b, n)) or (
            positions.dim() == 2 and tuple(positions.shape) == (1, n)
        )
        if not ok:
            raise ValueError(
                f"positions has shape {tuple(positions.shape)}; expected (N,) = ({n},) or "
                f"(B, N) = ({b}, {n}), or an int start offset"
            )
        pos = positions.to(device=device, dtype=torch.float64)
        return pos.reshape(-1, 1, n) if pos.dim() == 2 else pos.reshape(1, 1, n)
    if isinstance(positions, bool) or not isinstance(positions, int):
        raise ValueError(
            f"positions={positions!r} is not allowed; expected an int start offset or a tensor"
        )
    return torch.arange(positions, positions + n, device=device, dtype=torch.float64).view(1, 1, n)


def rope_angles(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Angles m·θ_i (…, N, dim/2) for float64 ``positions`` (…, N), θ_i = base^(-2i/dim)."""
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    return positions.unsqueeze(-1) * base**-exponents


def apply_rope(x: Tensor, positions: int | Tensor = 0, base: float = 10000.0) -> Tensor:
    """Rotate the feature pairs (x_{2i}, x_{2i+1}) of ``x`` (B, H, N, D) by m·θ_i.

    ``positions``: the absolute position of every token — an int start offset (tokens at
    ``start … start + N - 1``; 0 for a whole sequence, the cache length for a streaming
    step) or a tensor of shape (N,) or (B, N). ``base``: the θ base (10000 as in the
    paper). D must be even. Angles are formed in float64 (exact for large positions), the
    rotation in float32 (float64 for float64 input); returns x's dtype.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating 4-d tensor (B, H, N, D); got {shape}")
    b, _, n, d = x.shape
    if d % 2:
        raise ValueError(f"rotary embeddings rotate feature pairs; D must be even, got D={d}")
    ok = isinstance(base, (int, float)) and not isinstance(base, bool) and base > 1
    if not ok or base != base or base == float("inf"):
        raise ValueError(f"base={base!r} is not allowed; expected a finite number > 1")
    angles = rope_angles(_positions(positions, b, n, x.device), d, float(base))
    work = compute_dtype(x.dtype)
    cos, sin = angles.cos().to(work), angles.sin().to(work)
    xw = x.to(work)
    even, odd = xw[..., 0::2], xw[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
