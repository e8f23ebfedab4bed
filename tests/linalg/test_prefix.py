"""Chunk-wise causal prefix sums against the explicit masked product."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab.linalg.prefix import causal_dot_product, exclusive_cumsum, noncausal_dot_product


def _explicit(q, k, v):
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * torch.ones(n, n, dtype=q.dtype).tril()
    return scores @ v


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    chunk=st.integers(1, 50),
    f=st.integers(1, 6),
    e=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_causal_dot_product_matches_explicit(n, chunk, f, e, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, n, f, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, n, f, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, n, e, generator=g, dtype=torch.float64)
    out = causal_dot_product(q, k, v, chunk_size=chunk)
    assert out.shape == (2, 3, n, e)
    torch.testing.assert_close(out, _explicit(q, k, v), rtol=1e-10, atol=1e-10)


def test_noncausal_dot_product_matches_explicit():
    q, k, v = (torch.randn(2, 9, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(noncausal_dot_product(q, k, v), (q @ k.transpose(-1, -2)) @ v)


def test_causal_dot_product_gradcheck():
    q, k, v = (torch.randn(1, 7, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: causal_dot_product(a, b, c, 3), (q, k, v))


def test_exclusive_cumsum():
    x = torch.arange(1.0, 6.0).reshape(1, 5)
    torch.testing.assert_close(exclusive_cumsum(x, dim=1), torch.tensor([[0.0, 1, 3, 6, 10]]))
    y = torch.randn(3, 4, 2)
    torch.testing.assert_close(exclusive_cumsum(y, dim=0)[1:], y.cumsum(0)[:-1])
    assert (exclusive_cumsum(y, dim=0)[0] == 0).all()


def test_bad_arguments_raise():
    q = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        causal_dot_product(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match="v must be"):
        causal_dot_product(q, q, torch.randn(1, 5, 2))
    with pytest.raises(ValueError, match="same shape"):
        causal_dot_product(q, torch.randn(1, 4, 3), q)
