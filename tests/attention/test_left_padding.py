"""Left padding leaves every causal kernel's real outputs as the unpadded sequence gives
them, registry-wide and for ``causal_nystrom`` at segment sizes > 1 (its segments are
anchored at each row's first real token, not at position 0)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import attention

F64 = torch.float64
KERNELS = [(name, {}) for name in attention.available(causal=True)]
KERNELS += [("causal_nystrom", {"segment_size": s}) for s in (2, 4, 7)]
KERNELS += [("causal_nystrom", {"segment_size": 4, "landmark_system": "triangular"})]


def left_padded(x, pad, seed):
    """x (B, H, N, D) with ``pad`` positions of large junk in front."""
    g = torch.Generator().manual_seed(seed)
    junk = 10 * torch.randn(*x.shape[:2], pad, x.shape[-1], generator=g, dtype=x.dtype)
    return torch.cat([junk, x], dim=2)


@pytest.mark.parametrize("name, options", KERNELS, ids=[f"{n}{o or ''}" for n, o in KERNELS])
@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 40), pads=st.lists(st.integers(0, 9), min_size=2, max_size=2))
def test_left_padding_leaves_the_real_outputs_alone(name, options, n, pads):
    kernel = attention.build(name, **options).eval()
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g, dtype=F64) for _ in range(3))
    ref = kernel(q, k, v, causal=True)
    assert ref.abs().max() > 1e-2  # a kernel returning zeros would agree with itself
    width = max(pads)
    # row b: pads[b] junk positions in front, then (width - pads[b]) of right padding
    rows, masks = [], []
    for b, pad in enumerate(pads):
        row = [left_padded(t[b : b + 1], pad, seed=b) for t in (q, k, v)]
        row = [torch.nn.functional.pad(t, (0, 0, 0, width - pad)) for t in row]
        rows.append(row)
        masks.append((torch.arange(n + width) >= pad) & (torch.arange(n + width) < pad + n))
    qp, kp, vp = (torch.cat([r[i] for r in rows]) for i in range(3))
    out = kernel(qp, kp, vp, attention_mask=torch.stack(masks), causal=True)
    for b, pad in enumerate(pads):
        assert torch.allclose(out[b, :, pad : pad + n], ref[b], atol=1e-10, rtol=0), (b, pad)
        assert not out[b, :, :pad].any() and not out[b, :, pad + n :].any()


def test_causal_nystrom_left_padding_was_the_bug():
    """The measurement the fix answers: five left pads at s = 4 moved outputs by ~0.7 when
    segments started at position 0; anchored at the first real token they do not move, and
    the gradient reaches the real inputs only."""
    kernel = attention.build("causal_nystrom", segment_size=4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=F64) for _ in range(3))
    ref = kernel(q, k, v, causal=True)
    padded = [left_padded(t, 5, seed=1).requires_grad_() for t in (q, k, v)]
    mask = (torch.arange(35) >= 5)[None]
    out = kernel(*padded, attention_mask=mask, causal=True)
    assert (out[:, :, 5:] - ref).abs().max() <= 1e-12
    out.sum().backward()
    assert all(not t.grad[:, :, :5].any() for t in padded)
    # the positions' segmentation matters: a kernel anchored at 0 differs by far more
    shifted = kernel(*(left_padded(t, 1, seed=1) for t in (q, k, v)), causal=True)
    assert (shifted[:, :, 1:] - ref).abs().max() > 1e-2


def test_need_weights_follow_the_rotation():
    """The implied weights of a left-padded row are the unpadded row's, in the padded
    row's coordinates (columns of padding get no weight)."""
    kernel = attention.build("causal_nystrom", segment_size=3)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 10, 4, generator=g, dtype=F64) for _ in range(3))
    _, ref = kernel(q, k, v, causal=True, need_weights=True)
    padded = [left_padded(t, 4, seed=2) for t in (q, k, v)]
    mask = (torch.arange(14) >= 4)[None]
    _, weights = kernel(*padded, attention_mask=mask, causal=True, need_weights=True)
    assert torch.allclose(weights[..., 4:, 4:], ref, atol=1e-12)
    assert not weights[..., 4:, :4].any()
