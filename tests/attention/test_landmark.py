"""Landmark attention softmax(QK̃ᵀ)·softmax(Q̃Kᵀ)·V against its definition."""

import math

import pytest
import torch

from formerlab import attention


def reference(q, k, v, m):
    """Direct evaluation for N divisible by m, no padding (float64)."""
    b, h, n, d = q.shape
    q_l = q.reshape(b, h, m, n // m, d).mean(3)
    k_l = k.reshape(b, h, m, n // m, d).mean(3)
    f = (q @ k_l.mT / math.sqrt(d)).softmax(-1)
    r = (q_l @ k.mT / math.sqrt(d)).softmax(-1)
    return f @ r @ v, f @ r


def test_matches_definition_and_weights_are_row_stochastic():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 24, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, w = attention.build("landmark", num_landmarks=6)(q, k, v, need_weights=True)
    ref_out, ref_w = reference(q, k, v, 6)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 24, dtype=torch.float64))


@pytest.mark.parametrize("left", [False, True])
def test_padding_invariance_any_n(left):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 29, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 29, dtype=torch.bool)
    if left:
        mask[1, :11] = False
    else:
        mask[1, 18:] = False
    kern = attention.build("landmark", num_landmarks=5)
    out, w = kern(q, k, v, attention_mask=mask, need_weights=True)
    real = mask[1]
    alone = kern(q[1:, :, real], k[1:, :, real], v[1:, :, real])
    torch.testing.assert_close(out[1][:, real], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(out[1][:, ~real] == 0)
    assert torch.all(w[1][:, :, ~real] == 0)  # padded keys get no weight


def test_causal_raises_and_bad_options():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="causal"):
        attention.build("landmark")(q, q, q, causal=True)
    with pytest.raises(ValueError, match="num_landmarks"):
        attention.build("landmark", num_landmarks=0)
