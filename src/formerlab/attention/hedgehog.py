"""Hedgehog: linear attention with a learnable, softmax-mimicking feature map (and a gate).

Zhang, Bhatia, Kumbong and Ré, 2024, "The Hedgehog & the Porcupine: Expressive Linear
Attentions with Softmax Mimicry" (ICLR). Each head h has its own trainable linear map
W_h (D × F) and bias b_h; with z = W_hᵀ x + b_h the feature map is

    φ_h(x) = [softmax(z), softmax(-z)]        (2F features, each half a softmax over F)

the paper's exponential feature map [exp(z), exp(-z)] written with a softmax over the
features, as its implementation does for numerical stability. Queries and keys get
separate maps. φ > 0 everywhere, so φ(q)·φ(k) is a valid (positive) attention score and
the output is the usual normalised linear attention φ(q)·(Σ φ(k) vᵀ) / φ(q)·Σ φ(k)
(Katharopoulos et al., 2020). The maps start at W = I, b = 0 and are trained to imitate a
softmax attention (attention transfer; ``formerlab.experiments.linearize``).

``gate=True`` adds a data-dependent decay per head (the scalar gate of gated linear
attention / RetNet-style decays; Yang et al., 2024, "Gated Linear Attention Transformers
with Hardware-Efficient Training"; Sun et al., 2023, "Retentive Network"): from each key,
log γ_t = logsigmoid(w_hᵀ k_t + c_h) ∈ (-∞, 0), and token s contributes to query t with
weight ∏_{r=s+1..t} γ_r · φ(q_t)·φ(k_s), normalised over s ≤ t. The recurrent form is
S_t = γ_t S_{t-1} + φ(k_t) v_tᵀ, z_t = γ_t z_{t-1} + φ(k_t). The gate starts near 1
(w = 0, c = ``gate_init``), i.e. near the ungated map, and is causal only.

The kernels here have parameters whose shapes depend on the model (heads, head size), so
they are built per layer with those sizes and are not in the registry (whose kernels build
with no options for any shape); ``formerlab.experiments.linearize`` installs them into the
layers of a model swapped with :func:`formerlab.integrations.hf.swap_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerlab.attention.base import AttentionKernel, check_kernel_options, compute_dtype
from formerlab.attention.linear import (
    LinearState,
    empty_linear_state,
    linear_dims,
    linear_step,
    linear_sums,
    linear_weights,
    safe_denominator,
)
from formerlab.attention.streaming import check_step, state_dims
from formerlab.linalg.prefix import DEFAULT_CHUNK


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; expected an integer >= 1")
    return value


def _check_heads(what: str, x: Tensor, heads: int, head_dim: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != heads or x.shape[-1] != head_dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{what} takes (B, H={heads}, N, D={head_dim}) tensors (the sizes it was built "
            f"for); got {shape}"
        )


class HedgehogFeatureMap(nn.Module):
    """φ_h(x) = [softmax(W_hᵀx + b_h), softmax(-(W_hᵀx + b_h))] per head (Hedgehog, 2024).

    Args:
        heads: number of heads H (one map per head).
        head_dim: size D of the inputs.
        feature_dim: F, the size of each half (default D); the output has 2F features.

    ``forward(x)``: x (B, H, N, D) -> (B, H, N, 2F), positive, each half summing to 1;
    computed in float32 (float64 for float64 inputs), returned in x's dtype. W starts as
    the identity (the first min(D, F) features), b at 0.
    """

    def __init__(self, heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.heads = _positive_int("heads", heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.feature_dim = (
            head_dim if feature_dim is None else _positive_int("feature_dim", feature_dim)
        )
        eye = torch.eye(head_dim, self.feature_dim)
        self.weight = nn.Parameter(eye.expand(heads, -1, -1).clone())
        self.bias = nn.Parameter(torch.zeros(heads, self.feature_dim))

    @property
    def out_features(self) -> int:
        return 2 * self.feature_dim

    def features(self, x: Tensor) -> Tensor:
        """φ(x) in the compute dtype of x (float32, or float64 for float64 inputs)."""
        _check_heads("HedgehogFeatureMap", x, self.heads, self.head_dim)
        work = compute_dtype(x.dtype)
        z = torch.einsum("bhnd,hdf->bhnf", x.to(work), self.weight.to(work))
        z = z + self.bias.to(work)[:, None, :]
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


class KeyGate(nn.Module):
    """Per-head scalar decay from the keys: log γ_t = logsigmoid(w_hᵀ k_t + c_h) (B, H, N).

    ``init``: c_h at the start (w = 0): γ = sigmoid(init), close to 1 for init >> 0.
    """

    def __init__(self, heads: int, head_dim: int, init: float = 6.0) -> None:
        super().__init__()
        self.heads = _positive_int("heads", heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.weight = nn.Parameter(torch.zeros(heads, head_dim))
        self.bias = nn.Parameter(torch.full((heads,), float(init)))

    def forward(self, k: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """log γ (B, H, N) in k's compute dtype; 0 (no decay) at padded positions, so a
        padded row decays as the row alone."""
        _check_heads("KeyGate", k, self.heads, self.head_dim)
        work = compute_dtype(k.dtype)
        logits = torch.einsum("bhnd,hd->bhn", k.to(work), self.weight.to(work))
        log_gate = F.logsigmoid(logits + self.bias.to(work)[:, None])
        if attention_mask is not None:
            log_gate = log_gate * attention_mask[:, None, :].to(work)
        return log_gate

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


def decay_matrix(log_gate: Tensor, causal_offset: int = 0) -> Tensor:
    """exp(Σ_{r=s+1..t} log γ_r) for s <= t, 0 above the diagonal: (B, H, N, N).

    Differences of the cumulative sum are masked to -inf before exp, so no positive
    exponent is ever formed (no overflow however long the sequence)."""
    cum = log_gate.cumsum(-1)
    diff = cum[..., :, None] - cum[..., None, :]
    n = log_gate.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=log_gate.device).tril(causal_offset)
    return diff.masked_fill(~keep, float("-inf")).exp()


def gated_weights(
    phi_q: Tensor, phi_k: Tensor, log_gate: Tensor, attention_mask: Tensor | None
) -> Tensor:
    """The (B, H, N, N) causal attention matrix of gated feature-map attention: scores
    φ(q_t)·φ(k_s)·∏_{r=s+1..t} γ_r for s <= t (real keys only), normalised per row."""
    scores = (phi_q @ phi_k.transpose(-1, -2)) * decay_matrix(log_gate)
    if attention_mask is not None:
        scores = scores * attention_mask[:, None, None, :].to(scores.dtype)
    return scores / safe_denominator(scores.sum(-1, keepdim=True))


class HedgehogAttention(AttentionKernel):
    """Normalised linear attention with learnable Hedgehog feature maps for q and k, and
    optionally a key-driven decay gate (see the module docstring).

    Args:
        heads: H, head_dim: D — the sizes of the (B, H, N, D) queries and keys it takes.
        feature_dim: F per half of each feature map (default D; 2F features in all).
        gate: add the per-head decay gate (causal calls only).
        gate_init: the gate's initial bias c (γ starts at sigmoid(c)).
        chunk_size: chunk of the causal prefix sums (ungated; result independent of it).

    The ungated parallel call costs O(N·F·E); the gated one is computed in its quadratic
    form, O(N²) per head (fine for training contexts of a few hundred tokens); both stream
    with a constant-size state (``init_state`` / ``step``).
    """

    name = "hedgehog"
    supports_causal = True
    supports_streaming = True

    def __init__(
        self,
        heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        gate: bool = False,
        gate_init: float = 6.0,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        check_kernel_options("hedgehog", chunk_size=chunk_size)
        if not isinstance(gate, bool):
            raise ValueError(f"gate={gate!r} is not allowed; expected True or False")
        super().__init__()
        self.heads, self.head_dim = (
            _positive_int("heads", heads),
            _positive_int("head_dim", head_dim),
        )
        self.phi_q = HedgehogFeatureMap(heads, head_dim, feature_dim)
        self.phi_k = HedgehogFeatureMap(heads, head_dim, feature_dim)
        self.gate = KeyGate(heads, head_dim, gate_init) if gate else None
        self.chunk_size = chunk_size
        self.packed_modes = ("causal",) if gate else ("causal", "bidirectional")

    def options(self) -> dict:
        """The constructor's arguments (what rebuilds this kernel before loading weights)."""
        return {
            "heads": self.heads,
            "head_dim": self.head_dim,
            "feature_dim": self.phi_q.feature_dim,
            "gate": self.gate is not None,
            "gate_init": float(self.gate.bias.detach()[0]) if self.gate is not None else 6.0,
            "chunk_size": self.chunk_size,
        }

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        _check_heads("hedgehog attention", q, self.heads, self.head_dim)
        if self.gate is not None and not causal:
            raise ValueError(
                "hedgehog attention with gate=True decays along the sequence and runs causally "
                "only; use gate=False for a bidirectional call"
            )
        work = compute_dtype(q.dtype)
        phi_q, phi_k = self.phi_q.features(q), self.phi_k.features(k)
        if self.gate is None:
            out = linear_sums(phi_q, phi_k, v.to(work), attention_mask, causal, self.chunk_size)
            weights = None
            if need_weights:
                weights = linear_weights(phi_q, phi_k, attention_mask, causal)
        else:
            weights = gated_weights(phi_q, phi_k, self.gate(k, attention_mask), attention_mask)
            out = weights @ v.to(work)
        return out, (weights.to(q.dtype) if need_weights else None)

    def init_state(
        self, batch, heads, head_dim, *, dtype=torch.float32, device=None, value_dim=None
    ) -> LinearState:
        """A zero :class:`~formerlab.attention.linear.LinearState` (2F features per head).

        Its size does not depend on ``head_dim``; ``step`` refuses q, k of other sizes than
        the kernel was built for."""
        b, h, _, e, work = state_dims(batch, heads, head_dim, value_dim, dtype)
        return empty_linear_state(b, h, self.phi_q.out_features, e, work, device)

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: LinearState,
        attention_mask: Tensor | None = None,
    ):
        """``(out, state)`` for T new tokens (B, H, T, D); the state is never modified."""
        check_step(
            self.name,
            q,
            k,
            v,
            state,
            LinearState,
            lambda st: linear_dims(st, self.head_dim),
            attention_mask,
        )
        work = state.kv.dtype
        phi_q, phi_k = self.phi_q.features(q.to(work)), self.phi_k.features(k.to(work))
        if self.gate is None:
            out, state = linear_step(
                phi_q, phi_k, v.to(work), state, self.chunk_size, attention_mask
            )
            return out.to(q.dtype), state
        log_gate = self.gate(k.to(work), attention_mask)
        out, state = gated_step(phi_q, phi_k, v.to(work), log_gate, state, attention_mask)
        return out.to(q.dtype), state

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, "
            f"feature_dim={self.phi_q.feature_dim}, gate={self.gate is not None}"
        )


def gated_step(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    log_gate: Tensor,
    state: LinearState,
    attention_mask: Tensor | None,
) -> tuple[Tensor, LinearState]:
    """T new tokens of gated feature-map attention from the state (S, z) of the past:
    query i sees exp(cum_i)·(S, z) plus new tokens j <= i weighted by exp(cum_i - cum_j),
    cum the cumulative log gate over the new tokens; the new state is
    exp(cum_T)·(S, z) + Σ_j exp(cum_T - cum_j) φ(k_j) [v_j, 1]ᵀ."""
    if attention_mask is not None:
        phi_k = phi_k * attention_mask[:, None, :, None].to(phi_k.dtype)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    past = torch.cat([state.kv, state.k_sum.unsqueeze(-1)], dim=-1)  # (B, H, F, E + 1)
    cum = log_gate.cumsum(-1)  # (B, H, T), <= 0
    within = (phi_q @ phi_k.transpose(-1, -2)) * decay_matrix(log_gate)
    sums = within @ v1 + cum.exp()[..., None] * (phi_q @ past)
    out = sums[..., :-1] / safe_denominator(sums[..., -1:])
    if attention_mask is not None:
        out = out * attention_mask[:, None, :, None].to(out.dtype)
    carry = (cum[..., -1:] - cum).exp()  # decay from each new token to the last one
    new = cum[..., -1, None, None].exp() * past + (phi_k * carry[..., None]).transpose(-1, -2) @ v1
    state = LinearState(new[..., :-1], new[..., -1], state.length + v.shape[-2])
    return out, state


__all__ = [
    "HedgehogAttention",
    "HedgehogFeatureMap",
    "KeyGate",
    "decay_matrix",
    "gated_step",
    "gated_weights",
]
