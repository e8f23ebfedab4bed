"""Rotary position embeddings against a direct complex-number implementation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import attention
from formerlab.attention.rope import apply_rope
from formerlab.testing import assert_prefix_consistent


def complex_rope(x, positions, base=10000.0):
    """z_i · e^{i m θ_i} on z_i = x_{2i} + i x_{2i+1} (Su et al., 2021, eq. 13)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    rot = torch.polar(torch.ones_like(theta), positions.double()[..., None] * theta)
    return torch.view_as_real(z * rot).flatten(-2)


def _x(b=2, h=3, n=9, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g, dtype=dtype)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 12),
    half=st.integers(1, 8),
    start=st.integers(0, 100_000),
    seed=st.integers(0, 1000),
)
def test_matches_the_complex_rotation_float64(n, half, start, seed):
    x = _x(n=n, d=2 * half, seed=seed)
    positions = torch.arange(start, start + n)
    want = complex_rope(x, positions)
    torch.testing.assert_close(apply_rope(x, start), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(apply_rope(x, positions), want, rtol=0, atol=1e-10)


def test_per_sequence_positions_and_base():
    x = _x(b=2, n=5)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 100, 2]])
    out = apply_rope(x, positions, base=500.0)
    for b in range(2):
        want = complex_rope(x[b : b + 1], positions[b], base=500.0)
        torch.testing.assert_close(out[b : b + 1], want, rtol=0, atol=1e-10)


def test_scores_depend_on_relative_position_only():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64) for _ in range(2))

    def score(m, n):
        return float((apply_rope(q, m) * apply_rope(k, n)).sum())

    for m, n in [(0, 0), (5, 2), (2, 5), (40, 1)]:
        for shift in (1, 17, 1000):
            assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-10
    assert abs(score(5, 2) - score(2, 5)) > 1e-3  # it does see the offset (and its sign)
    assert abs(score(0, 0) - float((q * k).sum())) < 1e-12  # position 0 is the identity


def test_rotation_keeps_norms_and_dtype():
    x = _x(n=30)
    torch.testing.assert_close(
        apply_rope(x, 12345).norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-10
    )
    xb = x.to(torch.bfloat16)
    out = apply_rope(xb, 1000)
    assert out.dtype == torch.bfloat16
    # rotated in float32, rounded once: within half a bf16 ulp (2^-8 relative) of exact
    exact = apply_rope(xb.double(), 1000)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()
    assert apply_rope(x, 0)[:, :, :1].equal(x[:, :, :1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="D must be even"):
        apply_rope(_x(d=5))
    with pytest.raises(ValueError, match="positions has shape"):
        apply_rope(_x(n=4), torch.arange(5))
    with pytest.raises(ValueError, match="positions=1.5"):
        apply_rope(_x(), 1.5)
    with pytest.raises(ValueError, match="base"):
        apply_rope(_x(), 0, base=0.5)
    with pytest.raises(ValueError, match="4-d"):
        apply_rope(torch.randn(3, 4))


# --- rope in front of the kernels ---------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "causal_nystrom"])
def test_exp_kernels_with_rope_see_relative_positions_only(name):
    # a common shift of every position leaves the outputs unchanged
    kernel = attention.build(name, segment_size=4) if name == "causal_nystrom" else attention.build(name)
    q, k, v = _x(n=20, seed=2), _x(n=20, seed=3), _x(n=20, seed=4)
    base = kernel(apply_rope(q, 0), apply_rope(k, 0), v, causal=True)
    moved = kernel(apply_rope(q, 977), apply_rope(k, 977), v, causal=True)
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-10)
    assert (base - kernel(q, k, v, causal=True)).abs().max() > 1e-3  # rope does act


def test_linear_kernel_with_rope_stays_valid():
    # rotated before φ: weights stay non-negative and sum to one (convex combinations)
    kernel = attention.build("linear")
    q, k, v = _x(n=15, seed=5), _x(n=15, seed=6), _x(n=15, seed=7)
    _, w = kernel(apply_rope(q, 0), apply_rope(k, 0), v, causal=True, need_weights=True)
    assert (w >= 0).all() and (w.triu(1) == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


@pytest.mark.parametrize("name", attention.available(causal=True))
def test_rotary_kernels_are_prefix_consistent_and_stream(name):
    kernel = attention.build(name).eval()
    q, k, v = _x(b=1, h=2, n=40, d=4, seed=8), _x(b=1, h=2, n=40, d=4, seed=9), _x(b=1, h=2, n=40, d=4)

    def rotary(q, k, v):
        return kernel(apply_rope(q, 0), apply_rope(k, 0), v, causal=True)

    assert_prefix_consistent(rotary, [q, k, v], seq_dim=2, lengths=[1, 7, 33])
    state = kernel.init_state(1, 2, 4, dtype=torch.float64)
    outs = []
    for a, z in [(0, 9), (9, 10), (10, 40)]:  # a streaming step rotates from its offset
        out, state = kernel.step(apply_rope(q[:, :, a:z], a), apply_rope(k[:, :, a:z], a), v[:, :, a:z], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), rotary(q, k, v), rtol=0, atol=1e-8)
