"""Depthwise convolution of V along the sequence: the skip branch of Nyström attention.

Nyströmformer's code adds a depthwise convolution of the values (kernel 33) to the
attention output. Here it runs as a grouped ``conv2d`` over the H·D channels in the
channels-last layout, on one contiguous (B, N, H·D) copy of the values, with its own
backward. oneDNN's speed depends on which spatial axis carries the sequence and on the
tensors having the canonical channels-last strides (a size-1 axis with another stride
passes ``is_contiguous`` but takes a slow path). Measured at N = 8192, H·D = 256, K = 33,
1 thread: forward and input gradient run fastest with the sequence as the width,
(B, C, 1, N): 7.1 and 6.5 ms against 10.0 and 10.4 with it as the height; the weight
gradient only as the height, (B, C, N, 1): 10.4 ms against 213. Both are views of the same
memory. The input gradient is the forward convolution of the output gradient with the
flipped kernel. The fused Nyström product calls :func:`sequence_conv` and
:func:`sequence_conv_grads` itself, to add the skip block by block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from formerlab.attention.recompute import grads_by_recompute
from formerlab.errors import check_positive_int
from formerlab.linalg.numerics import autocast_off


def _as_width(x: Tensor) -> Tensor:
    """Contiguous (B, N, C) -> (B, C, 1, N) with canonical channels-last strides."""
    b, n, c = x.shape
    return x.as_strided((b, c, 1, n), (n * c, 1, n * c, c))


def _as_height(x: Tensor) -> Tensor:
    """Contiguous (B, N, C) -> (B, C, N, 1) with canonical channels-last strides."""
    b, n, c = x.shape
    return x.as_strided((b, c, n, 1), (n * c, 1, c, c))


def sequence_conv(x: Tensor, w: Tensor) -> Tensor:
    """x (B, N, C) contiguous, w (C, K): grouped conv along N, "same" zero padding; the
    result is a (B, N, C) view of channels-last memory."""
    c, k = w.shape
    out = TF.conv2d(_as_width(x), w.view(c, 1, 1, k), padding=(0, k // 2), groups=c)
    return out.permute(0, 3, 2, 1).reshape(x.shape)


def sequence_conv_grads(
    grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of :func:`sequence_conv` (x, w) for the output gradient ``grad``
    (B, N, C) contiguous; None where not needed."""
    dx = dw = None
    if need_x:
        # out[n] = Σ_t w[t]·x[n + t − p]  ⇒  dx[n] = Σ_t w[K − 1 − t]·grad[n + t − p]
        dx = sequence_conv(grad, w.flip(1))
    if need_w:
        c, k = w.shape
        dw = torch.ops.aten.convolution_backward(
            _as_height(grad), _as_height(x), w.view(c, 1, k, 1), None, [1, 1],
            [k // 2, 0], [1, 1], False, [0, 0], c, [False, True, False],
        )[1].view(c, k)
    return dx, dw


def to_channels(x: Tensor) -> Tensor:
    """Per-head (B, H, N, D) -> contiguous (B, N, H·D), the convolution's layout (no copy
    when x already has that memory, e.g. a merged-heads gradient)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d).contiguous()


def to_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H·D) -> its per-head (B, H, N, D) view."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def channel_filters(weight: Tensor, head_dim: int, dtype: torch.dtype) -> Tensor:
    """Per-head filters (H, K) -> per-channel filters (C, K), C = H·head_dim, in ``dtype``
    (a differentiable cast and repeat: the weight's gradient comes back in its own dtype)."""
    return weight.to(dtype).repeat_interleave(head_dim, dim=0)


class _SequenceConv(torch.autograd.Function):
    """Grouped convolution along N of x (B, N, C), contiguous, with w (C, K)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        # in x's dtype under autocast too: the backward (run without autocast) must see
        # the dtypes the forward used
        with autocast_off(x.device):
            return sequence_conv(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain convolution
            return grads_by_recompute(sequence_conv, (x, w), ctx.needs_input_grad, grad)
        grad = grad.contiguous()  # canonical strides for the views below
        return sequence_conv_grads(grad, x, w, *ctx.needs_input_grad)


def depthwise_conv_seq(v: Tensor, weight: Tensor) -> Tensor:
    """Depthwise convolution along the sequence with zero padding ("same" size).

    out[b, h, n, :] = Σ_t weight[h, t] · v[b, h, n + t − K//2, :] for v (B, H, N, D) and
    an odd-sized weight (H, K); the result is a (B, H, N, D) view of a (B, N, H, D)
    tensor. See the module docs for the layout and the backward.
    """
    x = to_channels(v)
    # v's dtype, so forward and hand-written backward agree
    w = channel_filters(weight, v.shape[-1], v.dtype)
    if torch.compiler.is_compiling():  # traced as the plain convolution
        out = sequence_conv(x, w)
    else:
        out = _SequenceConv.apply(x, w)
    return to_heads(out, v.shape[1])


class DepthwiseConvSkip(nn.Module):
    """Depthwise convolution of V along the sequence, added to the output (Nyströmformer's
    code uses a kernel of 33). Padded tokens are zeroed first, so real outputs do not see
    padding; ``heads=None`` shares one filter across heads.
    """

    def __init__(self, kernel_size: int, heads: int | None = None) -> None:
        super().__init__()
        check_positive_int("conv_kernel", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"conv_kernel={kernel_size} is not allowed; expected an odd integer so the "
                "output stays aligned with the input"
            )
        self.kernel_size = kernel_size
        self.heads = None if heads is None else check_positive_int("conv_heads", heads)
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv2d's default init for fan_in = k
        self.weight = nn.Parameter(torch.empty(heads or 1, kernel_size).uniform_(-bound, bound))

    def head_weights(self, heads: int, dtype: torch.dtype) -> Tensor:
        """The filters of ``heads`` heads, (heads, K) in ``dtype``."""
        if self.heads is not None and self.heads != heads:
            raise ValueError(f"conv_heads={self.heads} does not match the {heads} heads of the input")
        return self.weight.to(dtype).expand(heads, -1)

    def forward(self, v: Tensor, attention_mask: Tensor | None) -> Tensor:
        w = self.head_weights(v.shape[1], v.dtype)
        if attention_mask is not None:
            v = v * attention_mask[:, None, :, None].to(v.dtype)
        return depthwise_conv_seq(v, w)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, heads={self.heads or 'shared'}"


__all__ = [
    "DepthwiseConvSkip", "channel_filters", "depthwise_conv_seq", "sequence_conv", "sequence_conv_grads",
    "to_channels", "to_heads",
]
