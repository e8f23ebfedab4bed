"""Linear (feature-map) attention: φ(q)·(φ(K)ᵀV) / φ(q)·Σφ(k).

Katharopoulos et al., 2020, "Transformers are RNNs: Fast Autoregressive Transformers
with Linear Attention" (eq. 4-6): replacing exp(q·k) by a kernel φ(q)·φ(k) with a
non-negative feature map lets the sum over keys be computed once, O(N·D²) instead of
O(N²·D). Their default map is φ(x) = elu(x) + 1 (positive, so the normaliser is > 0).

Causal masking uses the chunk-wise prefix sums of :mod:`formerlab.linalg.prefix`, so
memory stays O(N·D + (N/C)·D²) per head — O(N·D) for chunk C ≈ D — never O(N·D²).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.attention.base import (
    AttentionKernel,
    check_kernel_options,
    compute_dtype,
    zero_padded_queries,
)
from formerlab.attention.registry import register
from formerlab.attention.streaming import check_step, state_dims
from formerlab.errors import check_choice
from formerlab.linalg.prefix import DEFAULT_CHUNK, causal_dot_product, noncausal_dot_product

FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    # Katharopoulos et al. (2020): elu(x) + 1 > 0 everywhere, smooth
    "elu": lambda x: F.elu(x) + 1.0,
    # non-negative but may be all-zero for a token (then the normaliser guard applies)
    "relu": F.relu,
    # smooth and positive, grows linearly like elu+1
    "softplus": F.softplus,
}


def safe_denominator(den: Tensor) -> Tensor:
    """``den`` where it is a normal positive number, else 1 (its numerator is then ~0).

    Replacing (rather than clamping) keeps the gradient num/den² finite for queries whose
    features vanish.
    """
    return torch.where(den > torch.finfo(den.dtype).tiny, den, torch.ones_like(den))


def linear_sums(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Normalised feature-map attention from features φq, φk (B, H, N, F) and v (B, H, N, E).

    Padded keys get zero features (no weight). With non-negative features the output is
    a convex combination of values whenever the normaliser is > 0, so the normaliser is
    only guarded against exact zero (a query whose features are all zero gets output 0,
    never NaN); an absolute ``eps`` would distort features that are legitimately tiny
    (e.g. Performer's). Works in the dtype of the inputs; callers pass float32/float64.
    """
    if attention_mask is not None:
        phi_k = phi_k * attention_mask[:, None, :, None].to(phi_k.dtype)
    # one extra value column of ones yields the normaliser from the same product
    ones = torch.ones_like(v[..., :1])
    v1 = torch.cat([v, ones], dim=-1)
    if causal:
        sums = causal_dot_product(phi_q, phi_k, v1, chunk_size)
    else:
        sums = noncausal_dot_product(phi_q, phi_k, v1)
    num, den = sums[..., :-1], sums[..., -1:]
    return num / safe_denominator(den)


def linear_weights(
    phi_q: Tensor, phi_k: Tensor, attention_mask: Tensor | None, causal: bool
) -> Tensor:
    """The explicit (B, H, N, N) attention matrix of feature-map attention (small N only)."""
    scores = phi_q @ phi_k.transpose(-1, -2)
    n = scores.shape[-1]
    if causal:
        scores = scores * torch.ones(n, n, device=scores.device, dtype=scores.dtype).tril()
    if attention_mask is not None:
        scores = scores * attention_mask[:, None, None, :].to(scores.dtype)
    return scores / safe_denominator(scores.sum(-1, keepdim=True))


@dataclass
class LinearState:
    """Streaming state of feature-map attention: constant size, whatever the position.

    ``kv`` (B, H, F, E) = Σ_j φ(k_j) v_jᵀ and ``k_sum`` (B, H, F) = Σ_j φ(k_j) over the
    tokens seen so far (``length``), in the compute dtype (Katharopoulos et al., 2020,
    eq. 18-20: the RNN form of causal linear attention). ``projection``: the random
    features of ``performer`` (fixed for the state's lifetime), None for ``linear``.
    """

    kv: Tensor
    k_sum: Tensor
    length: int = 0
    projection: Tensor | None = None


def empty_linear_state(
    batch: int, heads: int, features: int, value_dim: int, work: torch.dtype, device
) -> LinearState:
    """A zero :class:`LinearState` (B, H, F, E) in dtype ``work``."""
    kv = torch.zeros(batch, heads, features, value_dim, dtype=work, device=device)
    return LinearState(kv, torch.zeros(batch, heads, features, dtype=work, device=device))


def linear_dims(state: LinearState, head_dim: int) -> tuple[int, int, int, int]:
    """(B, H, D, E) of a state; D from its projection (performer) or ``head_dim``."""
    d = state.projection.shape[-1] if state.projection is not None else head_dim
    return (*state.kv.shape[:2], d, state.kv.shape[-1])


def linear_step(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, state: LinearState, chunk_size: int,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, LinearState]:
    """Outputs of T new tokens from their features (B, H, T, F) and the state; new state.

    New token i sees the state (every earlier token) plus new tokens j <= i, through the
    same chunk-wise prefix sums as the parallel call (one step of T tokens is the
    parallel call continued from the state). ``attention_mask`` (B, T), True = real:
    padded keys get zero features (they add nothing to the state), padded queries give 0.
    """
    if attention_mask is not None:
        phi_k = phi_k * attention_mask[:, None, :, None].to(phi_k.dtype)
    ones = torch.ones_like(v[..., :1])
    v1 = torch.cat([v, ones], dim=-1)
    past = torch.cat([state.kv, state.k_sum.unsqueeze(-1)], dim=-1)  # (B, H, F, E + 1)
    sums = causal_dot_product(phi_q, phi_k, v1, chunk_size) + phi_q @ past
    out = zero_padded_queries(sums[..., :-1] / safe_denominator(sums[..., -1:]), attention_mask)
    new = past + phi_k.transpose(-1, -2) @ v1
    state = LinearState(new[..., :-1], new[..., -1], state.length + v.shape[-2], state.projection)
    return out, state


@register(
    "linear",
    causal=True,
    complexity="O(N·D²) time; O(N·D) memory (causal: chunk-wise prefix sums, chunk C≈D)",
    description="feature-map linear attention, φ=elu+1 by default (Katharopoulos et al., 2020)",
)
class LinearAttention(AttentionKernel):
    """φ(q)·(φ(K)ᵀV) / φ(q)·Σφ(k) with a selectable feature map (default elu+1).

    ``feature_map``: one of ``FEATURE_MAPS`` (``"elu"``, ``"relu"``, ``"softplus"``) or a
    callable mapping (…, D) to non-negative (…, F). ``chunk_size``: chunk of the causal
    prefix sums (memory/speed trade-off, result independent of it).
    """

    name = "linear"
    supports_causal = True
    supports_streaming = True
    packed_modes = ("causal", "bidirectional")

    def __init__(
        self,
        feature_map: str | Callable[[Tensor], Tensor] = "elu",
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        check_kernel_options("linear", chunk_size=chunk_size)
        super().__init__()
        if not callable(feature_map):
            check_choice("feature_map", feature_map, FEATURE_MAPS)
        self.feature_map = feature_map
        self.phi = feature_map if callable(feature_map) else FEATURE_MAPS[feature_map]
        self.chunk_size = chunk_size

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        work = compute_dtype(q.dtype)
        phi_q, phi_k = self.phi(q.to(work)), self.phi(k.to(work))
        out = linear_sums(phi_q, phi_k, v.to(work), attention_mask, causal, self.chunk_size)
        weights = None
        if need_weights:
            weights = linear_weights(phi_q, phi_k, attention_mask, causal).to(q.dtype)
        return out, weights

    def init_state(self, batch, heads, head_dim, *, dtype=torch.float32, device=None,
                   value_dim=None) -> LinearState:
        """A zero :class:`LinearState`; memory O(F·E) per head, independent of position."""
        b, h, d, e, work = state_dims(batch, heads, head_dim, value_dim, dtype)
        features = self.phi(torch.zeros(1, d, dtype=work, device=device)).shape[-1]
        return empty_linear_state(b, h, features, e, work, device)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: LinearState,
        attention_mask: Tensor | None = None,
    ):
        """``(out, state)`` for T new tokens (B, H, T, D); O(T·F·E) whatever the position.
        ``attention_mask`` (B, T), True = real: padded tokens add nothing to the state."""
        d = q.shape[-1]
        dims = lambda st: linear_dims(st, d)  # noqa: E731
        check_step(self.name, q, k, v, state, LinearState, dims, attention_mask)
        work = state.kv.dtype
        phi_q, phi_k = self.phi(q.to(work)), self.phi(k.to(work))
        if phi_k.shape[-1] != state.kv.shape[-2]:
            raise ValueError(
                f"q, k of size D={d} give {phi_k.shape[-1]} features; the state holds "
                f"{state.kv.shape[-2]} (built for another head_dim)"
            )
        out, state = linear_step(
            phi_q, phi_k, v.to(work), state, self.chunk_size, attention_mask
        )
        return out.to(q.dtype), state

    def extra_repr(self) -> str:
        fmap = self.feature_map if isinstance(self.feature_map, str) else "custom"
        return f"feature_map={fmap!r}, chunk_size={self.chunk_size}"
