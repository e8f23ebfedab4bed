"""performer (FAVOR+, Choromanski et al., 2021) against exact softmax attention."""

import math

import pytest
import torch

from formerlab import attention
from formerlab.attention.performer import favor_features, orthogonal_gaussian


def _qkv(n=64, d=16, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(1, 2, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_orthogonal_blocks_with_gaussian_norms():
    w = orthogonal_gaussian(40, 16, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert w.shape == (40, 16)
    for block in (w[:16], w[16:32]):
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10  # rows within a block are orthogonal
    norms = w.norm(dim=-1)
    assert 2.0 < norms.mean() < 6.0  # chi(16) has mean ≈ 3.9


def test_features_estimate_the_softmax_kernel():
    # E[φ(q)·φ(k)] = exp(q·k) (Lemma 1): compare ratios across keys with many features
    g = torch.Generator().manual_seed(1)
    x = 0.4 * torch.randn(1, 1, 6, 8, generator=g, dtype=torch.float64)
    y = 0.4 * torch.randn(1, 1, 5, 8, generator=g, dtype=torch.float64)
    w = orthogonal_gaussian(20000, 8, g, dtype=torch.float64)
    est = favor_features(y, w, is_query=True) @ favor_features(x, w, is_query=False).transpose(
        -1, -2
    )
    exact = torch.exp(y @ x.transpose(-1, -2))
    ratio = est / exact  # a per-query constant (the query shift) times ~1
    ratio = ratio / ratio.mean(-1, keepdim=True)
    assert (ratio - 1).abs().mean() < 0.05
    assert (ratio - 1).abs().max() < 0.3


@pytest.mark.parametrize("causal", [False, True])
def test_error_shrinks_with_more_features(causal):
    ref_kernel = attention.build("softmax")
    errors = {}
    for m in (16, 256):
        err = 0.0
        for seed in range(3):
            q, k, v = _qkv(seed=seed)
            ref = ref_kernel(q, k, v, causal=causal)
            out = attention.build("performer", num_features=m, seed=seed)(q, k, v, causal=causal)
            err += (out - ref).abs().mean().item()
        errors[m] = err / 3
    assert errors[256] < errors[16]
    assert errors[256] < 0.5 * errors[16]


def test_causal_equals_explicit_masked_features():
    q, k, v = _qkv(n=21, seed=4)
    kernel = attention.build("performer", num_features=32, chunk_size=5)
    out, w = kernel(q, k, v, causal=True, need_weights=True)
    torch.testing.assert_close(out, w @ v)
    assert (w.triu(1) == 0).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 21, dtype=torch.float64))


def test_seed_and_redraw_policy():
    q, k, v = _qkv(n=10, seed=5)
    a = attention.build("performer", num_features=8, seed=3)
    b = attention.build("performer", num_features=8, seed=3)
    c = attention.build("performer", num_features=8, seed=4)
    torch.testing.assert_close(a(q, k, v), b(q, k, v))
    assert not torch.allclose(a(q, k, v), c(q, k, v))

    fixed = attention.build("performer", num_features=8, redraw_interval=0)
    first = fixed(q, k, v)
    torch.testing.assert_close(fixed(q, k, v), first)  # never redraws

    redraw = attention.build("performer", num_features=8, redraw_interval=2)
    outs = [redraw(q, k, v) for _ in range(3)]  # training mode: calls never redraw
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[1], outs[2])
    redraw.on_optimizer_step(1)  # optimiser steps 2, 4, ... redraw
    torch.testing.assert_close(redraw(q, k, v), outs[0])
    redraw.on_optimizer_step(2)
    assert int(redraw.draws) == 1
    assert not torch.allclose(redraw(q, k, v), outs[0])
    redraw.eval()
    frozen = redraw(q, k, v)
    torch.testing.assert_close(redraw(q, k, v), frozen)
    assert int(redraw.draws) == 1

    # a fresh module restores the same features from the state dict
    clone = attention.build("performer", num_features=8, redraw_interval=2)
    clone.load_state_dict(redraw.state_dict())
    clone.eval()
    torch.testing.assert_close(clone(q, k, v), frozen)


def test_large_inputs_stay_finite_and_bf16_keeps_dtype():
    q, k, v = _qkv(n=50, d=32, seed=6, scale=6.0)
    for causal in (False, True):
        qq = q.float().requires_grad_()
        out = attention.build("performer")(qq, k.float(), v.float(), causal=causal)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(qq.grad).all()
    out = attention.build("performer")(*(t.to(torch.bfloat16) for t in (q, k, v)), causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_padding_matches_unpadded():
    q, k, v = _qkv(n=12, seed=7)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 8:] = False
    kernel = attention.build("performer", num_features=32)
    for causal in (False, True):
        out = kernel(q, k, v, attention_mask=mask, causal=causal)
        short = kernel(q[:, :, :8], k[:, :, :8], v[:, :, :8], causal=causal)
        torch.testing.assert_close(out[:, :, :8], short)
        assert (out[:, :, 8:] == 0).all()


def test_bad_options_raise():
    for option, value in [
        ("num_features", 0),
        ("redraw_interval", -1),
        ("seed", 1.5),
        ("scale", 0.0),
    ]:
        with pytest.raises(ValueError, match=option):
            attention.build("performer", **{option: value})


def test_default_scale_is_inverse_sqrt_dim():
    q, k, v = _qkv(n=8, d=4, seed=8)
    a = attention.build("performer", num_features=16)(q, k, v)
    b = attention.build("performer", num_features=16, scale=1 / math.sqrt(4))(q, k, v)
    torch.testing.assert_close(a, b)
