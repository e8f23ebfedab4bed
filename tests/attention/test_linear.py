"""linear attention against its explicit O(N²) definition."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import attention
from formerlab.attention.linear import FEATURE_MAPS


def explicit(phi, q, k, v, mask=None, causal=False):
    """φ(q)·φ(k) weights, masked, normalised — the definition (Katharopoulos et al., 2020)."""
    w = phi(q) @ phi(k).transpose(-1, -2)
    n = w.shape[-1]
    if causal:
        w = w * torch.ones(n, n, dtype=w.dtype).tril()
    if mask is not None:
        w = w * mask[:, None, None, :]
    return (w / w.sum(-1, keepdim=True)) @ v


def _qkv(n, d=4, seed=0, b=2, h=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [False, True])
def test_matches_explicit_definition(feature_map, causal):
    q, k, v = _qkv(19, seed=1)
    out = attention.build("linear", feature_map=feature_map, chunk_size=4)(q, k, v, causal=causal)
    if feature_map == "relu":
        q, k = q.abs() + 0.1, k.abs() + 0.1  # relu: keep every normaliser > 0 for the reference
        out = attention.build("linear", feature_map="relu", chunk_size=4)(q, k, v, causal=causal)
    ref = explicit(FEATURE_MAPS[feature_map], q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_default_feature_map_is_elu_plus_one():
    q, k, v = _qkv(8, seed=2)
    ref = explicit(lambda x: F.elu(x) + 1, q, k, v, causal=True)
    torch.testing.assert_close(attention.build("linear")(q, k, v, causal=True), ref)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), chunk=st.integers(1, 40), seed=st.integers(0, 1000))
def test_result_does_not_depend_on_chunk_size(n, chunk, seed):
    q, k, v = _qkv(n, seed=seed)
    a = attention.build("linear", chunk_size=chunk)(q, k, v, causal=True)
    b = attention.build("linear", chunk_size=64)(q, k, v, causal=True)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_padding(causal):
    q, k, v = _qkv(12, seed=3)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 9:] = False
    out = attention.build("linear", chunk_size=5)(q, k, v, attention_mask=mask, causal=causal)
    ref = explicit(FEATURE_MAPS["elu"], q, k, v, mask=mask.double(), causal=causal)
    torch.testing.assert_close(out[0, :, :9], ref[0, :, :9])
    torch.testing.assert_close(out[1], ref[1])
    assert (out[0, :, 9:] == 0).all()


def test_callable_feature_map_and_weights():
    q, k, v = _qkv(10, seed=4)
    kernel = attention.build("linear", feature_map=lambda x: x.square() + 1.0)
    out, w = kernel(q, k, v, causal=True, need_weights=True)
    torch.testing.assert_close(out, explicit(lambda x: x.square() + 1.0, q, k, v, causal=True))
    torch.testing.assert_close(out, w @ v)
    assert (w.triu(1) == 0).all()


def test_all_zero_features_give_zero_not_nan():
    q, k, v = _qkv(6, seed=5)
    kernel = attention.build("linear", feature_map="relu")
    q = -q.abs() - 1.0  # relu(q) = 0 everywhere: normaliser 0
    q.requires_grad_()
    out = kernel(q, k, v, causal=True)
    assert (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bf16_input_returns_bf16_finite():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(300, d=16, seed=6))
    out = attention.build("linear")(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_options_raise():
    with pytest.raises(ValueError, match="feature_map"):
        attention.build("linear", feature_map="tanh")
    with pytest.raises(ValueError, match="chunk_size"):
        attention.build("linear", chunk_size=0)
