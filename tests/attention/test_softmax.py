"""The exact softmax kernel against a naive float64 reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import attention


def reference_attention(q, k, v, key_padding_mask=None, causal=False):
    """Textbook softmax attention in float64 with explicit loops over masks."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed &= key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = weights @ v
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, None, :, None]
        weights = weights * key_padding_mask[:, None, :, None]
    return out, weights


@st.composite
def attention_case(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n, d = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    lengths = [draw(st.integers(1, n)) for _ in range(b)]
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return q, k, v, mask


@settings(max_examples=40, deadline=None)
@given(case=attention_case(), causal=st.booleans(), use_mask=st.booleans())
def test_softmax_matches_reference(case, causal, use_mask):
    q, k, v, mask = case
    mask = mask if use_mask else None
    kernel = attention.build("softmax")
    expected, expected_w = reference_attention(q, k, v, mask, causal)
    out = kernel(q, k, v, key_padding_mask=mask, causal=causal)
    out_w, weights = kernel(q, k, v, key_padding_mask=mask, causal=causal, need_weights=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_w.double(), expected, atol=1e-5, rtol=1e-5)
    assert weights.shape == (q.shape[0], q.shape[1], q.shape[2], q.shape[2])
    if mask is not None:  # padded query rows carry no meaning; compare the real ones
        weights = weights * mask[:, None, :, None]
    torch.testing.assert_close(weights.double(), expected_w, atol=1e-5, rtol=1e-5)


def test_float64_is_exact_and_dtype_is_kept():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = attention.build("softmax")(q, k, v, causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, reference_attention(q, k, v, causal=True)[0], atol=1e-12, rtol=1e-12
    )
    out16 = attention.build("softmax")(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_left_padding_under_causal_mask_has_no_nan_and_zero_grad_at_pads():
    q = torch.randn(1, 1, 5, 4, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True]])
    out = attention.build("softmax")(q, q, q, key_padding_mask=mask, causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[0, 0, :2] == 0).all()


def test_bad_inputs_name_the_argument():
    kernel = attention.build("softmax")
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must be a 4-d tensor"):
        kernel(x[0], x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        kernel(x, x, x, key_padding_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="must agree"):
        kernel(x, x[:, :, :3], x)


def test_registry_errors_list_valid_choices():
    with pytest.raises(
        ValueError, match=r"unknown attention kernel 'nope'; available: \[.*'softmax'"
    ):
        attention.build("nope")
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['landmarks'\].*valid options: \['scale'\]"
    ):
        attention.build("softmax", landmarks=3)
    assert "softmax" in attention.available(causal=True)
    assert set(attention.available(causal=True)) <= set(attention.available())


def test_non_causal_kernel_refuses_causal_and_names_alternatives():
    non_causal = [n for n in attention.available() if n not in attention.available(causal=True)]
    x = torch.randn(1, 1, 4, 4)
    for name in non_causal:
        with pytest.raises(ValueError, match="causal kernels"):
            attention.build(name)(x, x, x, causal=True)
