"""Pooling (PoolFormer) against an explicit loop over windows, with masks and causality."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import mixers
from formerlab.mixers.pooling import Pooling


def naive_pooling(x, pool_size, mask=None, causal=False):
    b, n, _ = x.shape
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    left = pool_size - 1 if causal else (pool_size - 1) // 2
    out = torch.zeros_like(x)
    for bi in range(b):
        for i in range(n):
            if not real[bi, i]:
                continue
            window = [j for j in range(i - left, i - left + pool_size) if 0 <= j < n and real[bi, j]]
            out[bi, i] = x[bi, window].mean(0) - x[bi, i]
    return out


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    n=st.integers(1, 9),
    dim=st.integers(1, 4),
    pool_size=st.integers(1, 6),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_windows(batch, n, dim, pool_size, causal, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=gen, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.rand(batch, n, generator=gen) < 0.7  # holes anywhere, not just a tail
    got = Pooling(dim, pool_size)(x, attention_mask=mask, causal=causal)
    torch.testing.assert_close(got, naive_pooling(x, pool_size, mask, causal), rtol=1e-12, atol=1e-12)


def test_poolformer_example_and_dtypes():
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    # centred window of 3 (edges average what exists): means 1.5, 7/3, 14/3, 6
    want = torch.tensor([[[0.5], [7 / 3 - 2], [14 / 3 - 4], [-2.0]]])
    torch.testing.assert_close(Pooling(1, 3)(x), want)
    # causal window of 3: means 1, 1.5, 7/3, 14/3
    want_causal = torch.tensor([[[0.0], [-0.5], [7 / 3 - 4], [14 / 3 - 8]]])
    torch.testing.assert_close(Pooling(1, 3)(x, causal=True), want_causal)
    half = Pooling(1, 3)(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, atol=2e-2, rtol=2e-2)


def test_padding_does_not_leak_into_real_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3)
    mask = torch.tensor([[True, False, True, True, False, True, True], [True] * 4 + [False] * 3])
    other = torch.where(mask[..., None], x, torch.randn(2, 7, 3) * 100)
    for causal in (False, True):
        a = Pooling(3, 3)(x, mask, causal=causal)
        b = Pooling(3, 3)(other, mask, causal=causal)
        torch.testing.assert_close(a, b)
        assert (a[~mask] == 0).all()


def test_registry_and_errors():
    pool = mixers.build("pooling", dim=8, heads=4, pool_size=5)  # heads accepted, ignored
    assert isinstance(pool, Pooling) and pool.pool_size == 5
    assert sum(p.numel() for p in pool.parameters()) == 0
    with pytest.raises(ValueError, match="pool_size=0"):
        Pooling(8, 0)
    with pytest.raises(ValueError, match="unknown option"):
        mixers.build("pooling", dim=8, heads=2, kernel="softmax")
