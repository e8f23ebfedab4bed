"""double_softmax (Shen et al., 2021) against its definition."""

import pytest
import torch

from formerlab import attention


def _qkv(n=9, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_matches_definition_and_rows_sum_to_one():
    q, k, v = _qkv()
    kernel = attention.build("double_softmax")
    out, w = kernel(q, k, v, need_weights=True)
    ref = q.softmax(-1) @ (k.softmax(-2).transpose(-1, -2) @ v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, w @ v)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 9, dtype=torch.float64))


def test_padded_keys_have_no_influence():
    q, k, v = _qkv(seed=1)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    kernel = attention.build("double_softmax")
    out = kernel(q, k, v, attention_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 6:] += 5.0
    v2[1, :, 6:] -= 3.0
    torch.testing.assert_close(out, kernel(q, k2, v2, attention_mask=mask))
    short = kernel(q[1:, :, :6], k[1:, :, :6], v[1:, :, :6])
    torch.testing.assert_close(out[1, :, :6], short[0])
    assert (out[1, :, 6:] == 0).all()


def test_all_padded_sequence_is_finite():
    q, k, v = _qkv(seed=2)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    q.requires_grad_()
    out = attention.build("double_softmax")(q, k, v, attention_mask=mask)
    assert (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bf16_keeps_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(seed=3))
    out = attention.build("double_softmax")(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_causal_raises_with_alternatives():
    with pytest.raises(ValueError, match="double_softmax") as err:
        attention.build("double_softmax")(*_qkv(), causal=True)
    for alternative in ("linear", "performer", "causal_nystrom"):
        assert alternative in str(err.value)
