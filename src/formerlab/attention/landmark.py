"""Landmark attention softmax(QK̃ᵀ)·softmax(Q̃Kᵀ)·V, and the landmark factors it shares
with Nyström attention.

Nyströmformer (Xiong et al., AAAI 2021, §3) writes softmax(QKᵀ/√d) ≈ F·W⁺·R with the m
landmarks Q̃, K̃ (segment means of Q and K) and

    F = softmax(Q K̃ᵀ/√d)  (N×m),   W = softmax(Q̃ K̃ᵀ/√d)  (m×m),   R = softmax(Q̃ Kᵀ/√d)  (m×N).

The ``landmark`` kernel is the two-softmax linear attention F·R·V that this construction
starts from (no middle matrix): O(N·m·d) time and memory, a row-stochastic product.

Landmarks are the means of segments of each sequence's *real* tokens
(:mod:`formerlab.linalg.segments`), so m need not divide N and padding neither biases
the landmarks nor changes any output at a real position (padding invariance). Padded keys
get no weight in R. All factors are computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from formerlab.attention.base import AttentionKernel, check_kernel_options
from formerlab.attention.registry import register
from formerlab.linalg.numerics import compute_dtype
from formerlab.linalg.segments import SegmentLayout, segment_layout, segment_means


@dataclass
class LandmarkFactors:
    """The pieces of a landmark/Nyström approximation for one call (compute dtype).

    Attributes:
        q: scaled queries q·scale (B, H, N, D).
        k, v: keys and values (B, H, N, D).
        q_land, k_land: landmarks (B, H, m, D) (q_land from scaled queries).
        F: softmax(q k̃ᵀ) (B, H, N, m), empty landmarks get no weight.
        R: softmax(q̃ kᵀ) (B, H, m, N), padded keys get no weight.
        layout: the segment layout (which token belongs to which landmark).
        landmark_mask: (B, 1, 1, m) bool, True for non-empty landmarks, or None if all are.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    q_land: Tensor
    k_land: Tensor
    F: Tensor
    R: Tensor
    layout: SegmentLayout
    landmark_mask: Tensor | None

    def W(self) -> Tensor:
        """softmax(q̃ k̃ᵀ) (B, H, m, m) over the non-empty landmarks."""
        scores = self.q_land @ self.k_land.mT
        if self.landmark_mask is not None:
            scores = scores.masked_fill(~self.landmark_mask, float("-inf"))
        return scores.softmax(dim=-1)

    def assignment(self) -> Tensor:
        """(B, 1, m, N) matrix S with landmarks = S·x (1/count at a segment's tokens)."""
        lay = self.layout
        m = lay.num_segments
        onehot = torch.nn.functional.one_hot(lay.ids, m + 1)[..., :m].to(self.q.dtype)
        return (onehot / lay.counts.clamp(min=1)[:, None, :].to(self.q.dtype)).mT[:, None]


def landmark_factors(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Tensor | None,
    num_landmarks: int,
    scale: float | None = None,
) -> LandmarkFactors:
    """Compute landmarks, F and R for a kernel call (see :class:`LandmarkFactors`)."""
    b, _, n, d = q.shape
    work = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qs, kf, vf = q.to(work) * scale, k.to(work), v.to(work)
    layout = segment_layout(n, num_landmarks, attention_mask, b, q.device)
    q_land, nonempty = segment_means(qs, layout=layout)
    k_land, _ = segment_means(kf, layout=layout)
    # empty landmarks only exist for sequences shorter than m; a sequence without any real
    # token keeps all (its outputs are zeroed anyway) so no softmax row is empty -> no NaN
    lmask = None
    if n <= num_landmarks or attention_mask is not None:
        lmask = (nonempty | (layout.lengths == 0)[:, None])[:, None, None, :]
    f_scores = qs @ k_land.mT
    if lmask is not None:
        f_scores = f_scores.masked_fill(~lmask, float("-inf"))
    r_scores = q_land @ kf.mT
    if attention_mask is not None:
        keys = attention_mask | ~attention_mask.any(dim=-1, keepdim=True)
        r_scores = r_scores.masked_fill(~keys[:, None, None, :], float("-inf"))
    return LandmarkFactors(
        qs, kf, vf, q_land, k_land, f_scores.softmax(dim=-1), r_scores.softmax(dim=-1),
        layout, lmask,
    )


class LandmarkAttention(AttentionKernel):
    """softmax(QK̃ᵀ/√d)·softmax(Q̃Kᵀ/√d)·V with m padding-aware segment-mean landmarks.

    Args:
        num_landmarks: m >= 1.
        scale: logit scale (default 1/√D).
    """

    name = "landmark"
    supports_causal = False
    packed_modes = ("bidirectional",)  # landmarks over each row's real tokens

    def __init__(self, num_landmarks: int = 64, scale: float | None = None) -> None:
        check_kernel_options(
            "landmark", nullable=("scale",), num_landmarks=num_landmarks, scale=scale
        )
        super().__init__()
        self.num_landmarks = num_landmarks
        self.scale = None if scale is None else float(scale)

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        fac = landmark_factors(q, k, v, attention_mask, self.num_landmarks, self.scale)
        out = fac.F @ (fac.R @ fac.v)
        weights = (fac.F @ fac.R).to(q.dtype) if need_weights else None
        return out, weights

    def extra_repr(self) -> str:
        return f"num_landmarks={self.num_landmarks}"


@register(
    "landmark",
    causal=False,
    complexity="O(N·m·D) time and memory",
    description="two-softmax landmark attention softmax(QK̃ᵀ)·softmax(Q̃Kᵀ)·V (Nyström without W⁺)",
    packed_modes=LandmarkAttention.packed_modes,
)
def _build_landmark(num_landmarks: int = 64, scale: float | None = None) -> LandmarkAttention:
    return LandmarkAttention(num_landmarks=num_landmarks, scale=scale)
