"""Metric-tensor attention: one shared projection per head and a learned metric.

Multi-head dot-product scores are a bilinear form xᵢᵀ Uₙ xⱼ with Uₙ = Q̂ₙᵀ K̂ₙ
(Vaswani et al., 2017, "Attention Is All You Need"). Metric-tensor attention restricts
it: each head projects once, p = Pₙ x (dimension k), learns a *symmetric* metric Mₙ
(k × k) and scores

    rᵢⱼ = pᵢᵀ Mₙ pⱼ / √k,      out = softmax(r) p,

i.e. the same p serves as queries, keys and values; heads are concatenated and mapped
back by an output projection E (R. Campos, "From scaled dot product to metric tensor" and
"CUDA kernel of the metric tensor attention", nlp-metaformer project notes, 2024). Against standard attention (three dim × H·k projections
plus E) it keeps one projection plus E: roughly half the attention parameters.

Because rᵢⱼ = (pᵢ Mₙ) · pⱼ, the whole mixer is one attention-kernel call on
(q = pM, k = p, v = p): O(N²k) time and, with a fused kernel, O(N) memory, rather than the
O(N²k²) of a formulation that materialises every (token pair, feature pair) product
(see ``formerlab.bench.metric`` for that reference). Any registered kernel works —
softmax, Nyström, the causal kernels — with ``causal=True`` and key padding masks; the
scale 1/√k is the kernel's default 1/√D since the kernel sees D = k features.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from formerlab import attention
from formerlab.errors import check_choice, check_positive_int
from formerlab.mixers.base import TokenMixer
from formerlab.mixers.registry import register
from formerlab.mixers.self_attention import merge_heads, split_heads
from formerlab.mixers.short_conv import checked_window, convolve_padded, optional_short_conv
from formerlab.mixers.streaming import (
    attend,
    attend_step,
    check_rope,
    kernel_packs,
    kernel_streams,
    new_attention_state,
    with_window,
)

METRICS = ("symmetric", "psd", "diagonal")


def resolve_head_dim(dim: int, heads: int, head_dim: int | None) -> int:
    """``head_dim`` if given, else ``dim // heads`` (which must divide exactly)."""
    check_positive_int("dim", dim)
    check_positive_int("heads", heads)
    if head_dim is None:
        if dim % heads:
            raise ValueError(
                f"dim={dim} must be divisible by heads={heads} (or pass head_dim explicitly)"
            )
        return dim // heads
    return check_positive_int("head_dim", head_dim)


def build_kernel(mixer: str, mixer_options: list[str], kernel: str, options: dict[str, Any]):
    """Build attention kernel ``kernel`` for a mixer that takes flat ``**kernel_options``.

    An option neither the mixer nor the kernel knows is named together with both lists,
    so a typo in a mixer option does not read as a kernel problem.
    """
    entry = attention.KERNELS.entry(kernel)
    if not entry.accepts_any_option():
        unknown = sorted(set(options) - set(entry.options()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for token mixer {mixer!r} with kernel {kernel!r}; "
                f"mixer options: {mixer_options}; kernel options: {entry.options()}"
            )
    return attention.build(kernel, **options)


def triangle_index(k: int) -> tuple[Tensor, Tensor]:
    """Index maps for a k × k matrix stored as its upper triangle (k(k+1)/2 entries).

    Returns ``(sym, low)``: ``sym[a, b]`` is the storage slot of entry (min(a,b), max(a,b)),
    so ``tri[..., sym]`` is the symmetric matrix; ``low`` is a (k, k) bool mask of the
    lower triangle (diagonal included), used to unpack a Cholesky-style factor.
    """
    rows, cols = torch.triu_indices(k, k)
    slot = torch.empty(k, k, dtype=torch.long)
    slot[rows, cols] = torch.arange(rows.numel())
    slot[cols, rows] = torch.arange(rows.numel())
    return slot, torch.ones(k, k, dtype=torch.bool).tril()


class MetricAttention(TokenMixer):
    """Metric-tensor attention: scores pᵢᵀMpⱼ/√k, values p, one projection per head.

    Args:
        dim: model width C.
        heads: number of heads H.
        head_dim: projection size k per head (default ``dim // heads``).
        kernel: registered attention-kernel name; ``kernel_options`` go to it.
        metric: how Mₙ is parametrised —

            * ``"symmetric"``: Mₙ stored as its upper triangle, k(k+1)/2 parameters per head,
              and unpacked by index (each off-diagonal parameter fills both mirror slots).
              Chosen over (A + Aᵀ)/2 because that stores k² numbers of which k(k−1)/2 (the
              antisymmetric part) never affect the output yet still count as parameters
              and still take weight decay; the triangle is symmetric by construction
              after any optimizer step and its parameter count is honest.
            * ``"psd"``: Mₙ = LₙLₙᵀ with Lₙ lower triangular (k(k+1)/2 parameters), so Mₙ is
              positive semi-definite — a true (pseudo-)metric on the projected space.
            * ``"diagonal"``: Mₙ = diag(dₙ), k parameters per head (not sign-constrained).

            Every metric starts at the identity, i.e. at tied query/key attention.
        proj_bias: bias on the shared projection P (the output projection E always has one).
        rope: rotate the kernel's queries pM and keys p by position (rotary embeddings;
            the values p stay unrotated).
        conv: taps of a short causal convolution over p (SiLU) before the scores; 0 for
            none (as the ``attention`` mixer's ``conv``).

    ``init_state`` / ``step`` stream through the kernel's state when it has one.
    """

    name = "metric"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        kernel: str = "softmax",
        metric: str = "symmetric",
        proj_bias: bool = False,
        rope: bool = False,
        conv: int = 0,
        **kernel_options: Any,
    ) -> None:
        super().__init__(dim)
        self.head_dim = k = resolve_head_dim(dim, heads, head_dim)
        self.heads = heads
        self.rope = check_rope(rope, k)
        self.conv = optional_short_conv(conv, heads * k)
        self.metric = check_choice("metric", metric, METRICS)
        self.proj = nn.Linear(dim, heads * k, bias=proj_bias)
        self.out = nn.Linear(heads * k, dim)
        self.kernel = build_kernel(
            "metric", ["head_dim", "kernel", "metric", "proj_bias", "rope", "conv"], kernel,
            kernel_options,
        )
        sym, low = triangle_index(k)
        # Index buffers are derived from k; not persistent so checkpoints hold parameters only.
        self.register_buffer("_sym_index", sym, persistent=False)
        self.register_buffer("_low_mask", low, persistent=False)
        if metric == "diagonal":
            self.metric_params = nn.Parameter(torch.ones(heads, k))
        else:
            # Upper-triangle storage of the identity (symmetric) or of its Cholesky factor
            # (psd, where the factor's lower triangle is read through the same slot map).
            eye = torch.eye(k)[torch.triu_indices(k, k).unbind(0)]
            self.metric_params = nn.Parameter(eye.repeat(heads, 1))

    @property
    def supports_causal(self) -> bool:
        return self.kernel.supports_causal

    def packs(self, causal: bool) -> bool:
        """Packed sequences (``cu_seqlens``) wherever the kernel takes them."""
        return (self.supports_causal or not causal) and kernel_packs(self.kernel, causal)

    def factor(self) -> Tensor:
        """The lower-triangular factor Lₙ (H, k, k) of a ``psd`` metric, Mₙ = LₙLₙᵀ."""
        if self.metric != "psd":
            raise ValueError(f"factor() needs metric='psd'; this mixer has metric={self.metric!r}")
        full = self.metric_params[:, self._sym_index]
        return full * self._low_mask.to(full.dtype)

    def metric_tensor(self) -> Tensor:
        """The metric Mₙ for every head, shape (H, k, k) (symmetric by construction)."""
        if self.metric == "diagonal":
            return torch.diag_embed(self.metric_params)
        if self.metric == "psd":
            low = self.factor()
            return low @ low.transpose(-1, -2)
        return self.metric_params[:, self._sym_index]

    def queries(self, p: Tensor) -> Tensor:
        """pM for projected tokens p (B, H, N, k); M is symmetric so pM = (Mp)ᵀ."""
        if self.metric == "diagonal":  # a broadcast multiply, no k × k matmul
            return p * self.metric_params.to(p.dtype)[None, :, None, :]
        return p @ self.metric_tensor().to(p.dtype)

    @property
    def supports_streaming(self) -> bool:
        return self.supports_causal and kernel_streams(self.kernel)

    def projected(
        self, x: Tensor, attention_mask: Tensor | None = None, window: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """p per head (B, H, N, k), through the convolution (after ``window``) if any, and
        the convolution's new window."""
        p, window = convolve_padded(self.conv, self.proj(x), attention_mask, window)
        return split_heads(p, self.heads), window

    def mix(self, x: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        p, _ = self.projected(x, attention_mask)
        out = attend(self.kernel, self.queries(p), p, p, attention_mask, causal, self.rope)
        return self.out(merge_heads(out))

    def new_state(self, batch: int, dtype: torch.dtype, device: Any):
        k = self.head_dim
        state = new_attention_state(self.kernel, batch, self.heads, k, k, dtype, device)
        return with_window(state, self.conv, batch, dtype, device)

    def step_mix(self, x: Tensor, state, attention_mask: Tensor | None = None):
        window = checked_window(state, self.conv, f"token mixer 'metric' ({self.extra_repr()})")
        p, window = self.projected(x, attention_mask, window)
        out, state = attend_step(
            self.kernel, self.queries(p), p, p, state, self.rope, attention_mask
        )
        return self.out(merge_heads(out)), replace(state, window=window)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, "
            f"metric={self.metric!r}" + (", rope=True" if self.rope else "")
        )


register(
    "metric",
    causal=True,
    complexity="O(N²·k) time with the softmax kernel (one kernel call on (pM, p, p))",
    description="metric-tensor attention: shared projection p, scores pᵢᵀMpⱼ, values p "
    "(options: metric=symmetric|psd|diagonal, kernel=...)",
    variants=tuple({"metric": m} for m in METRICS),
)(MetricAttention)
