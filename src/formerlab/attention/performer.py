"""Performer / FAVOR+ attention: positive orthogonal random features for the softmax kernel.

Choromanski et al., 2021, "Rethinking Attention with Performers" (ICLR), Lemma 1:
for w ~ N(0, I_D),

    exp(x·y) = E_w[ exp(wᵀx - |x|²/2) · exp(wᵀy - |y|²/2) ],

so with m random vectors the softmax kernel exp(q·k/√D) (x = k/D^¼, y = q/D^¼) is
estimated by φ(q)·φ(k) with *positive* features (no negative normaliser). Drawing the
w in blocks of D mutually orthogonal rows with chi(D)-distributed norms (their
section 2.4, "orthogonal random features") lowers the variance further. Attention is
then linear attention with these features: O(N·m·D) time; causal masking uses the
chunk-wise prefix sums of :mod:`formerlab.linalg.prefix` (memory linear in N).

Numerical stabilisation. ``exp(wᵀx - |x|²/2)`` can overflow. Any factor shared by all
keys of a query cancels in the ratio, but a shift that depends on *other keys* (e.g. the
max over the sequence, as usually done) would make a causal output depend on future
keys through rounding. The causal path therefore shifts key feature r by a
data-independent constant α_r and gives query feature r the factor e^{α_r} back (the
products are unchanged). Completing the square, wᵀx - |x|²/2 <= |w|²/2 for every x, so
α_r = max(0, |wᵣ|²/2 - 60) bounds every key exponent by 60: no overflow, even summed
over 10⁵ keys in float32. For usual head sizes (D <~ 100, |w|² ≈ D) α = 0 and the
features are those of the paper; each feature depends on its own token only, so causal
outputs are exactly leak-free. Queries are shifted by their own max (cancels). Keys of
very large norm (|k|/D^¼ >~ 12), or D >~ 256, lose features to underflow (a less
accurate estimate); if all of a query's features vanish, the normaliser is guarded and
the output is 0 rather than NaN. Each query is then rescaled so that its normaliser is
about 1 (``normaliser_shift``: a causal cumulative sum, detached, cancels), which keeps
gradients finite when normalisers are tiny. The non-causal path additionally shifts keys
by their shared max, which is safe there.

Random features: ``num_features`` (m), ``seed`` (the projection is a deterministic
function of seed, draw index and D, so checkpoints restore it from the ``draws``
buffer), ``redraw_interval`` (0 = fixed features; r > 0 = new features every r
*optimiser steps*, as recommended by the paper to avoid overfitting to one draw).

Redraws happen between optimiser steps, never inside a forward: the training loop calls
``on_optimizer_step(step)`` on every submodule that defines it after each step, and the
kernel then switches to draw ``step // r`` when r divides ``step`` (a function of seed and
step: a resumed run uses the same draws). The forward is a pure function of its inputs
and the ``draws`` buffer, so every call of one forward sees the same features: a DEQ
solver iterates one fixed function, and its implicit backward differentiates the
features the forward used. Nor does the forward hold a Python-side counter: under
``torch.compile`` the projection is one opaque op (``formerlab::performer_projection``)
of the ``draws`` buffer, so a fresh kernel is captured as one graph, and a redraw (an
in-place write to the buffer) neither breaks the graph nor recompiles it.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from formerlab.attention.base import AttentionKernel, check_kernel_options, compute_dtype
from formerlab.attention.linear import (
    LinearState,
    empty_linear_state,
    linear_dims,
    linear_step,
    linear_sums,
    linear_weights,
)
from formerlab.attention.registry import register
from formerlab.attention.streaming import check_step, state_dims
from formerlab.linalg.prefix import DEFAULT_CHUNK

# largest key-feature exponent of the causal path (e^60 summed over 1e5 keys < float32 max)
_MAX_EXP = 60.0


def orthogonal_gaussian(
    num_features: int, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(num_features, dim) rows: blocks of ``dim`` orthonormal directions scaled by chi(dim) norms.

    Each block is the Q factor of a Gaussian matrix (sign-corrected so it is Haar
    distributed); row norms are those of independent Gaussian vectors, so every row is
    marginally N(0, I) while rows within a block are exactly orthogonal (Choromanski
    et al., 2021, sec. 2.4).
    """
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64, device=generator.device)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        blocks.append(q.T)
    directions = torch.cat(blocks)[:num_features]
    norms = torch.randn(
        num_features, dim, generator=generator, dtype=torch.float64, device=generator.device
    ).norm(dim=-1)
    return (directions * norms[:, None]).to(dtype)


@functools.lru_cache(maxsize=64)
def draw_projection(
    seed: int, draw: int, num_features: int, dim: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """The (num_features, dim) projection of draw ``draw`` of ``seed`` (cached; never modify it).

    A distinct generator stream per (seed, draw): reproducible and independent draws.
    """
    with torch.inference_mode(False):  # usable by autograd even if first drawn in inference
        gen = torch.Generator().manual_seed(seed * 1_000_003 + draw)
        return orthogonal_gaussian(num_features, dim, gen).to(device=device, dtype=dtype)


@torch.library.custom_op("formerlab::performer_projection", mutates_args=())
def projection_op(
    draws: Tensor, seed: int, num_features: int, dim: int, dtype: torch.dtype
) -> Tensor:
    """``draw_projection`` of the draw index held in the 0-d tensor ``draws``, as one opaque
    op for ``torch.compile``: the index is read inside the op (no graph break), and a new
    value of the buffer needs no recompilation."""
    return draw_projection(seed, int(draws), num_features, dim, draws.device, dtype).clone()


@projection_op.register_fake
def _(draws: Tensor, seed: int, num_features: int, dim: int, dtype: torch.dtype) -> Tensor:
    return draws.new_empty((num_features, dim), dtype=dtype)


def favor_features(
    x: Tensor,
    w: Tensor,
    is_query: bool,
    attention_mask: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """Positive random features of scaled inputs ``x`` (B, H, N, D) for projection ``w`` (m, D).

    Returns (B, H, N, m) features whose products φ(q)·φ(k) estimate exp(q·k) up to a
    factor per query (which cancels in attention). See the module doc for the shifts.
    """
    proj = x @ w.T
    half_sq = 0.5 * (x * x).sum(-1, keepdim=True)
    # data-independent per-feature key shift: key exponents <= _MAX_EXP (module doc)
    alpha = (0.5 * (w * w).sum(-1) - _MAX_EXP).clamp_min(0.0)
    if is_query:
        logits = proj - half_sq + alpha
        shift = logits.amax(dim=-1, keepdim=True).detach()
        return torch.exp(logits - shift)
    logits = proj - half_sq - alpha
    if not causal:
        # non-causal: one shift shared by all (real) keys of a sequence is safe and
        # keeps large-norm keys away from underflow
        masked = logits
        if attention_mask is not None:
            masked = logits.masked_fill(~attention_mask[:, None, :, None], float("-inf"))
        shift = masked.amax(dim=(-2, -1), keepdim=True).detach()
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        logits = logits - shift
    return torch.exp(logits)


def normaliser_shift(
    phi_q: Tensor,
    phi_k: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    prior: Tensor | None = None,
) -> Tensor:
    """Per-query factor (B, H, N, 1) that brings each normaliser φ(q_i)·Σ_{j (<= i)} φ(k_j)
    close to 1 (at most e⁶⁰ up, as query features are <= 1).

    It cancels in the ratio and is built from keys a query may see (a causal cumulative
    sum), so it is leak-free; detached, as a constant factor has zero derivative. Without
    it, tiny normalisers (large D or large inputs) give finite outputs but overflowing
    gradients (∂out/∂den = -out/den). ``prior`` (B, H, F): Σφ(k) of earlier tokens (a
    streaming step continues the cumulative sum from it).
    """
    with torch.no_grad():
        if attention_mask is not None:
            phi_k = phi_k * attention_mask[:, None, :, None].to(phi_k.dtype)
        z = phi_k.cumsum(-2) if causal else phi_k.sum(-2, keepdim=True)
        if prior is not None:
            z = z + prior.unsqueeze(-2)
        den = (phi_q * z).sum(-1, keepdim=True)
        log_den = torch.log(torch.where(den > 0, den, torch.ones_like(den)))
        return torch.exp(-log_den.clamp_min(-_MAX_EXP))


@register(
    "performer",
    causal=True,
    complexity="O(N·m·D) time, O(N·m) memory (m random features; causal: prefix sums)",
    description="FAVOR+ positive orthogonal random features (Choromanski et al., 2021)",
)
class PerformerAttention(AttentionKernel):
    """FAVOR+ attention with positive orthogonal random features (Choromanski et al., 2021).

    ``num_features``: m random features. ``redraw_interval``: 0 = never redraw; r > 0 =
    new features every r optimiser steps (``on_optimizer_step``, called by the training
    loop; a forward never changes the draw). ``seed``: seeds the draws (same seed, same
    features). ``scale``: logit scale (default 1/√D). ``chunk_size``: as in ``linear``.

    Streams with a constant-size :class:`~formerlab.attention.linear.LinearState` that
    holds the projection of the draw in use when it was created (a redraw later does not
    change a running state's features).
    """

    name = "performer"
    supports_causal = True
    supports_streaming = True
    packed_modes = ("causal", "bidirectional")

    def __init__(
        self,
        num_features: int = 256,
        redraw_interval: int = 0,
        seed: int = 0,
        scale: float | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        check_kernel_options(
            "performer", nullable=("scale",), num_features=num_features,
            redraw_interval=redraw_interval, seed=seed, scale=scale, chunk_size=chunk_size,
        )
        super().__init__()
        self.num_features, self.redraw_interval, self.seed = num_features, redraw_interval, seed
        self.scale = None if scale is None else float(scale)
        self.chunk_size = chunk_size
        # persistent: a checkpoint restores which draw is in use; features are rebuilt
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(_drop_call_counter)

    def projection(self, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The (num_features, dim) projection of the current draw (``draws``); read-only."""
        if torch.compiler.is_compiling():  # no host read of `draws` in a graph
            return projection_op(self.draws, self.seed, self.num_features, dim, dtype).to(device)
        return draw_projection(self.seed, int(self.draws), self.num_features, dim, device, dtype)

    def redraw(self) -> None:
        """Switch to the next random draw of features now (by hand; in training,
        ``on_optimizer_step`` sets the draw from the step count)."""
        with torch.no_grad():
            self.draws += 1

    def on_optimizer_step(self, step: int) -> None:
        """Training-loop hook, called after optimiser step ``step`` (1, 2, ...): with
        ``redraw_interval`` r > 0, switch to draw ``step // r`` when r divides ``step``
        (so r, 2r, ... redraw; the draw is a function of seed and step, and a resumed run
        continues with the same ones). The only place features change during training."""
        if self.redraw_interval and step % self.redraw_interval == 0:
            with torch.no_grad():
                self.draws.fill_(step // self.redraw_interval)

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        work = compute_dtype(q.dtype)  # the draw never changes here (module doc)
        d = q.shape[-1]
        root = self._scaled(d)
        w = self.projection(d, q.device, work)
        phi_q = favor_features(q.to(work) * root, w, is_query=True)
        phi_k = favor_features(k.to(work) * root, w, False, attention_mask, causal)
        phi_q = phi_q * normaliser_shift(phi_q, phi_k, attention_mask, causal)
        out = linear_sums(phi_q, phi_k, v.to(work), attention_mask, causal, self.chunk_size)
        weights = None
        if need_weights:
            weights = linear_weights(phi_q, phi_k, attention_mask, causal).to(q.dtype)
        return out, weights

    def _scaled(self, d: int) -> float:
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(d)
        return math.sqrt(scale)  # split the scale between q and k: x·y = scale·q·k

    def init_state(self, batch, heads, head_dim, *, dtype=torch.float32, device=None,
                   value_dim=None) -> LinearState:
        """A zero constant-size state (m·E per head) with the current draw's features."""
        b, h, d, e, work = state_dims(batch, heads, head_dim, value_dim, dtype)
        state = empty_linear_state(b, h, self.num_features, e, work, device)
        device = state.kv.device
        state.projection = self.projection(d, device, work)
        return state

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: LinearState,
        attention_mask: Tensor | None = None,
    ):
        """``(out, state)`` for T new tokens (B, H, T, D); O(T·m·(D + E)) at any position.
        ``attention_mask`` (B, T), True = real: padded tokens add nothing to the state."""
        dims = lambda st: linear_dims(st, 0)  # noqa: E731
        check_step(self.name, q, k, v, state, LinearState, dims, attention_mask)
        w = state.projection
        if w is None:
            raise ValueError("state has no random features; build it with performer.init_state")
        d = w.shape[-1]
        work = state.kv.dtype
        root = self._scaled(d)
        phi_q = favor_features(q.to(work) * root, w, is_query=True)
        phi_k = favor_features(k.to(work) * root, w, False, None, causal=True)
        shift = normaliser_shift(phi_q, phi_k, attention_mask, True, prior=state.k_sum)
        phi_q = phi_q * shift
        out, state = linear_step(
            phi_q, phi_k, v.to(work), state, self.chunk_size, attention_mask
        )
        return out.to(q.dtype), state

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, redraw_interval={self.redraw_interval}, "
            f"seed={self.seed}"
        )


def _drop_call_counter(state_dict, prefix, *_) -> None:
    """Checkpoints written before redraws moved to ``on_optimizer_step`` hold a ``calls``
    counter; it means nothing now (the ``draws`` index is what they restore)."""
    state_dict.pop(prefix + "calls", None)
