"""The exact softmax kernel against a row-by-row float64 reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import attention


def looped_reference(q, k, v, attention_mask=None, causal=False, scale=None):
    """Softmax attention written out row by row in float64, with the kernel contract made
    explicit: a padded query row gives output 0 (and no weights); a real query attends to
    the real keys it may see (j <= i under ``causal``) — never empty, it sees itself."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(b, h, n, n, dtype=torch.float64)
    real = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else attention_mask
    for bi in range(b):
        for i in range(n):
            if not real[bi, i]:
                continue
            keys = [j for j in range(n) if real[bi, j] and (not causal or j <= i)]
            for hi in range(h):
                s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in keys]) * scale
                w = torch.exp(s - s.max())
                w = w / w.sum()
                weights[bi, hi, i, keys] = w
                out[bi, hi, i] = (w[:, None] * v[bi, hi, keys]).sum(0)
    return out, weights


MASK_KINDS = ("none", "right", "left", "holes")


@st.composite
def attention_case(draw):
    """q, k, v and a key padding mask: right padding, left padding, or arbitrary holes;
    any number of real tokens per sequence, including none (a fully padded row)."""
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n, d = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    kind = draw(st.sampled_from(MASK_KINDS))
    if kind == "none":
        return q, k, v, None
    if kind == "holes":
        rows = [draw(st.lists(st.booleans(), min_size=n, max_size=n)) for _ in range(b)]
        return q, k, v, torch.tensor(rows, dtype=torch.bool).reshape(b, n)
    lengths = torch.tensor([draw(st.integers(0, n)) for _ in range(b)])[:, None]
    pos = torch.arange(n)[None, :]
    mask = pos < lengths if kind == "right" else pos >= n - lengths
    return q, k, v, mask


@settings(max_examples=60, deadline=None)
@given(
    case=attention_case(),
    causal=st.booleans(),
    scale=st.one_of(st.none(), st.floats(0.05, 4.0)),
)
def test_softmax_matches_reference(case, causal, scale):
    q, k, v, mask = case
    kernel = attention.build("softmax", scale=scale)
    expected, expected_w = looped_reference(q, k, v, mask, causal, scale)
    qg = q.clone().requires_grad_()
    out = kernel(qg, k, v, attention_mask=mask, causal=causal)
    out_w, weights = kernel(q, k, v, attention_mask=mask, causal=causal, need_weights=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_w.double(), expected, atol=1e-5, rtol=1e-5)
    assert weights.shape == (q.shape[0], q.shape[1], q.shape[2], q.shape[2])
    assert torch.isfinite(weights).all()
    if mask is not None:  # padded query rows carry no meaning; compare the real ones
        weights = weights * mask[:, None, :, None]
    torch.testing.assert_close(weights.double(), expected_w, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()  # fully padded rows and left padding: no NaN gradient
    assert torch.isfinite(qg.grad).all()
    if mask is not None:  # padded queries have zero output, so zero gradient
        assert (qg.grad * ~mask[:, None, :, None] == 0).all()


def test_reference_on_a_hand_computed_case():
    """The looped reference itself, against numbers worked out by hand."""
    q = torch.tensor([[[[1.0], [0.0], [2.0]]]])
    k = torch.tensor([[[[1.0], [1.0], [0.0]]]])
    v = torch.tensor([[[[1.0], [2.0], [3.0]]]])
    mask = torch.tensor([[False, True, True]])  # left padding: token 0 is padded
    out, weights = looped_reference(q, k, v, mask, causal=True, scale=1.0)
    # query 1 sees key 1 only; query 2 sees keys 1, 2 with logits 2·1 = 2 and 2·0 = 0
    w = math.exp(2) / (math.exp(2) + 1)
    assert out[0, 0, :, 0].tolist() == pytest.approx([0.0, 2.0, 2 * w + 3 * (1 - w)])
    assert weights[0, 0, 2].tolist() == pytest.approx([0.0, w, 1 - w])


def test_float64_is_exact_and_dtype_is_kept():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = attention.build("softmax")(q, k, v, causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, looped_reference(q, k, v, causal=True)[0], atol=1e-12, rtol=1e-12
    )
    out16 = attention.build("softmax")(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_left_padding_under_causal_mask_has_no_nan_and_zero_grad_at_pads():
    q = torch.randn(1, 1, 5, 4, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True]])
    out = attention.build("softmax")(q, q, q, attention_mask=mask, causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[0, 0, :2] == 0).all()


def test_bad_inputs_name_the_argument():
    kernel = attention.build("softmax")
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must be a 4-d tensor"):
        kernel(x[0], x, x)
    with pytest.raises(ValueError, match="attention_mask"):
        kernel(x, x, x, attention_mask=torch.ones(1, 4))
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
