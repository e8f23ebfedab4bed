"""QuadraticAttention against a naive float64 einsum of softmax(pᵢᵀCpⱼ/√D) (Vx)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import mixers
from formerlab.mixers.quadratic import QuadraticAttention


def naive_quadratic(mixer, x, mask=None, causal=False):
    h, k = mixer.heads, mixer.head_dim
    p = torch.einsum("bnc,hkc->bhnk", x, mixer.proj.weight.view(h, k, -1))
    v = torch.einsum("bnc,hkc->bhnk", x, mixer.value.weight.view(h, k, -1))
    if mixer.rank is None:
        core, feat = mixer.core, k
    else:
        core, feat = torch.einsum("har,hbr->hab", mixer.left, mixer.right), mixer.rank
    scores = torch.einsum("bhia,hac,bhjc->bhij", p, core, p) / math.sqrt(feat)
    n = x.shape[1]
    allowed = torch.ones(x.shape[0], 1, n, n, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    live = allowed.any(-1, keepdim=True)
    weights = torch.where(live, scores.masked_fill(~allowed, float("-inf")), 0.0).softmax(-1)
    out = torch.einsum("bhij,bhjk->bhik", weights, v)
    if mask is not None:
        out = out * mask[:, None, :, None]
    out = out.transpose(1, 2).reshape(x.shape[0], n, h * k)
    return out @ mixer.out.weight.T + mixer.out.bias


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    n=st.integers(1, 6),
    heads=st.integers(1, 3),
    k=st.integers(1, 4),
    rank_frac=st.one_of(st.none(), st.floats(0.0, 1.0)),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_einsum(batch, n, heads, k, rank_frac, causal, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rank = None if rank_frac is None else max(1, round(rank_frac * k))
    dim = heads * k
    mixer = QuadraticAttention(dim, heads, rank=rank).double()
    with torch.no_grad():  # move off the symmetric starting point
        for param in ([mixer.core] if rank is None else [mixer.left, mixer.right]):
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(batch, n, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = None
    if padded:
        mask = torch.arange(n)[None, :] < torch.randint(0, n + 1, (batch, 1), generator=gen)
    got = mixer(x, attention_mask=mask, causal=causal)
    want = naive_quadratic(mixer, x, mask, causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = [x] + [p for p in mixer.parameters()]
    grad_out = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    for g, w in zip(
        torch.autograd.grad(got, params, grad_out, allow_unused=True),
        torch.autograd.grad(want, params, grad_out, allow_unused=True),
    ):
        if g is None or w is None:  # out.bias etc. are shared; None only if both unused
            assert g is None and w is None
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_core_is_general_and_low_rank():
    torch.manual_seed(0)
    full = QuadraticAttention(16, 2)
    torch.testing.assert_close(full.core_matrix(), torch.eye(8).repeat(2, 1, 1))
    low = QuadraticAttention(16, 2, rank=3)
    with torch.no_grad():
        low.left.normal_()
        low.right.normal_()
    core = low.core_matrix()
    assert torch.linalg.matrix_rank(core).tolist() == [3, 3]
    assert not torch.allclose(core, core.mT)  # nothing forces symmetry
    # The gradient of the full core is not symmetric either: training can leave the
    # symmetric starting point (the difference from metric attention).
    x = torch.randn(2, 5, 16)
    full(x, causal=True).square().sum().backward()
    g = full.core.grad
    assert not torch.allclose(g, g.mT)


def test_parameter_counts():
    dim, heads, k = 64, 4, 16
    full = sum(p.numel() for p in QuadraticAttention(dim, heads).parameters())
    assert full == 3 * dim * dim + dim + heads * k * k
    low = sum(p.numel() for p in QuadraticAttention(dim, heads, rank=4).parameters())
    assert low == 3 * dim * dim + dim + heads * 2 * k * 4


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="rank=9 is not allowed.*head_dim=8"):
        QuadraticAttention(16, 2, rank=9)
    with pytest.raises(ValueError, match="rank=0"):
        QuadraticAttention(16, 2, rank=0)
    with pytest.raises(ValueError, match="unknown option.*'rnak'.*'quadratic'.*mixer options: .*rank"):
        mixers.build("quadratic", dim=16, heads=2, rnak=2)


def test_registry_builds_with_flat_kernel_options():
    mixer = mixers.build("quadratic", dim=16, heads=2, rank=2, kernel="softmax", scale=0.25)
    assert isinstance(mixer, QuadraticAttention) and mixer.kernel.scale == 0.25
