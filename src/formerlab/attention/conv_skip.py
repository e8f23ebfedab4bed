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
flipped kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from formerlab.attention.recompute import grads_by_recompute
from formerlab.errors import check_positive_int


def _as_width(x: Tensor) -> Tensor:
    """Contiguous (B, N, C) -> (B, C, 1, N) with canonical channels-last strides."""
    b, n, c = x.shape
    return x.as_strided((b, c, 1, n), (n * c, 1, n * c, c))


def _as_height(x: Tensor) -> Tensor:
    """Contiguous (B, N, C) -> (B, C, N, 1) with canonical channels-last strides."""
    b, n, c = x.shape
    return x.as_strided((b, c, n, 1), (n * c, 1, c, c))


def _conv_width(x: Tensor, w: Tensor) -> Tensor:
    """x (B, N, C) contiguous, w (C, K): grouped conv along N, "same" zero padding; the
    result is a (B, N, C) view of channels-last memory."""
    c, k = w.shape
    out = TF.conv2d(_as_width(x), w.view(c, 1, 1, k), padding=(0, k // 2), groups=c)
    return out.permute(0, 3, 2, 1).reshape(x.shape)


class _SequenceConv(torch.autograd.Function):
    """Grouped convolution along N of x (B, N, C), contiguous, with w (C, K)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        # in x's dtype under autocast too: the backward (run without autocast) must see
        # the dtypes the forward used
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _conv_width(x, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain convolution
            return grads_by_recompute(_conv_width, (x, w), ctx.needs_input_grad, grad)
        grad = grad.contiguous()  # canonical strides for the views below
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # out[n] = Σ_t w[t]·x[n + t − p]  ⇒  dx[n] = Σ_t w[K − 1 − t]·grad[n + t − p]
            dx = _conv_width(grad, w.flip(1))
        if ctx.needs_input_grad[1]:
            c, k = w.shape
            dw = torch.ops.aten.convolution_backward(
                _as_height(grad), _as_height(x), w.view(c, 1, k, 1), None, [1, 1],
                [k // 2, 0], [1, 1], False, [0, 0], c, [False, True, False],
            )[1].view(c, k)
        return dx, dw


def depthwise_conv_seq(v: Tensor, weight: Tensor) -> Tensor:
    """Depthwise convolution along the sequence with zero padding ("same" size).

    out[b, h, n, :] = Σ_t weight[h, t] · v[b, h, n + t − K//2, :] for v (B, H, N, D) and
    an odd-sized weight (H, K); the result is a (B, H, N, D) view of a (B, N, H, D)
    tensor. See the module docs for the layout and the backward.
    """
    b, h, n, d = v.shape
    x = v.transpose(1, 2).reshape(b, n, h * d).contiguous()
    # v's dtype (a differentiable cast), so forward and hand-written backward agree
    w = weight.to(v.dtype).repeat_interleave(d, dim=0)  # (C, K)
    if torch.compiler.is_compiling():  # traced as the plain convolution
        out = _conv_width(x, w)
    else:
        out = _SequenceConv.apply(x, w)
    return out.view(b, n, h, d).transpose(1, 2)


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

    def forward(self, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        h = v.shape[1]
        if self.heads is not None and self.heads != h:
            raise ValueError(f"conv_heads={self.heads} does not match the {h} heads of the input")
        if key_padding_mask is not None:
            v = v * key_padding_mask[:, None, :, None].to(v.dtype)
        return depthwise_conv_seq(v, self.weight.to(v.dtype).expand(h, -1))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, heads={self.heads or 'shared'}"


__all__ = ["DepthwiseConvSkip", "depthwise_conv_seq"]
