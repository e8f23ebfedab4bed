"""Nyström attention from the projection's input (``nystrom_projected``) and the mixer's
dispatch to it: against the dense formula on explicitly projected q, k, v (exact
pseudoinverse), gradcheck in float64, and the mixer's general q, k, v path."""

import importlib

import pytest
import torch

from formerlab.attention.nystrom_projected import nystrom_projected
from formerlab.mixers.self_attention import SelfAttention, merge_heads

D64 = torch.float64
product = importlib.import_module("formerlab.attention.nystrom_product")


def segment_matrix(n: int, m: int) -> torch.Tensor:
    """(m, N) mean over segment floor(r·m/N), written out densely."""
    S = torch.zeros(m, n, dtype=D64)
    for r in range(n):
        S[r * m // n, r] = 1.0
    return S / S.sum(-1, keepdim=True)


def shifted_sums(v, w):
    """Σ_t w[h, t]·v[b, h, n + t − K//2, :], zero outside the sequence."""
    k = w.shape[-1]
    n = v.shape[-2]
    out = torch.zeros_like(v)
    for t in range(k):
        s = t - k // 2
        lo, hi = max(0, -s), min(n, n - s)
        out[..., lo:hi, :] += w[None, :, t, None, None] * v[..., lo + s:hi + s, :]
    return out


def dense_reference(x, weight, bias, heads, m, scale, conv=None, inverse=torch.linalg.pinv):
    """q, k, v projected explicitly, then F·inverse(W)·R·v (+ the convolution) from dense
    matrices."""
    qkv = x @ weight.mT + (0 if bias is None else bias)
    b, n, _ = x.shape
    q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    S = segment_matrix(n, m)
    ql, kl = S @ q * scale, S @ k
    out = (q * scale @ kl.mT).softmax(-1) @ inverse((ql @ kl.mT).softmax(-1)) \
        @ (ql @ k.mT).softmax(-1) @ v
    return out if conv is None else out + shifted_sums(v, conv)


def inputs(b=2, n=37, c=12, heads=3, bias=True, conv=True, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=D64).requires_grad_(grad)

    return (rand(b, n, c), rand(3 * c, c) / c ** 0.5, rand(3 * c) if bias else None,
            rand(heads, 5) if conv else None)


@pytest.mark.parametrize("n,m", [(37, 4), (64, 8), (9, 8), (100, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_projected_product_equals_the_dense_formula_on_projected_qkv(n, m, bias):
    x, weight, b, conv = inputs(n=n, bias=bias)
    out = nystrom_projected(x, weight, b, 3, m, torch.linalg.pinv, 0.4, conv)
    ref = dense_reference(x, weight, b, 3, m, 0.4, conv)
    # (the exact pseudoinverse of W amplifies rounding: errors up to 8e-10 seen)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    # merging the heads is a view: out is (B, N, H, D) memory
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("n,block", [(37, 16), (64, 16), (33, 32)])
def test_blocked_forward_and_backward_equal_the_dense_gradient(monkeypatch, n, block):
    # row blocks (the last one ragged for 37 and 33) for the softmax over N and the
    # scores' gradients written into one buffer per block; with inv, whose derivative
    # amplifies rounding less than pinv's (seen up to 6e-10 with it)
    monkeypatch.setattr(product, "BLOCK_ROWS", block)
    x, weight, b, conv = inputs(n=n, grad=True)
    out = nystrom_projected(x, weight, b, 3, 4, torch.linalg.inv, 0.4, conv)
    ref = dense_reference(x, weight, b, 3, 4, 0.4, conv, torch.linalg.inv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=D64)
    leaves = (x, weight, b, conv)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_projected_product_gradcheck_and_gradgradcheck(monkeypatch):
    monkeypatch.setattr(product, "BLOCK_ROWS", 4)  # several blocks
    x, weight, b, conv = inputs(b=1, n=9, c=4, heads=2, grad=True)

    def f(x, weight, b, conv):  # inv: pinv's own second derivative fails gradgradcheck here
        return nystrom_projected(x, weight, b, 2, 2, torch.linalg.inv, 0.7, conv)

    assert torch.autograd.gradcheck(f, (x, weight, b, conv))
    assert torch.autograd.gradgradcheck(f, (x, weight, b, conv))  # the recompute path
    # its first derivative must be the hand-written one too
    g = torch.randn(f(x, weight, b, conv).shape, generator=torch.Generator().manual_seed(3),
                    dtype=D64)
    plain = torch.autograd.grad(f(x, weight, b, conv), (x, weight, b, conv), g)
    graphed = torch.autograd.grad(f(x, weight, b, conv), (x, weight, b, conv), g,
                                  create_graph=True)
    for a, c in zip(plain, graphed):
        assert c.requires_grad
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_projected_product_refuses_bad_shapes():
    x, weight, b, conv = inputs(n=8)
    with pytest.raises(ValueError, match="N > num_landmarks; got N=8, num_landmarks=8"):
        nystrom_projected(x, weight, b, 3, 8, torch.linalg.pinv, 0.4, conv)
    with pytest.raises(ValueError, match=r"weight has shape \(35, 12\)"):
        nystrom_projected(x, weight[:35], None, 3, 4, torch.linalg.pinv, 0.4, conv)


def mixer(bias=True, conv=5, m=4, **options):
    torch.manual_seed(0)
    mod = SelfAttention(24, 3, kernel="nystrom", num_landmarks=m, qkv_bias=bias,
                        conv_kernel=conv, conv_heads=3 if conv else None, **options).double()
    if conv:
        with torch.no_grad():
            mod.kernel.conv.weight.normal_()  # zero-initialised: make the skip count
    return mod


def general_path(mod, x):
    """The mixer's q, k, v path (what the fused one replaces)."""
    from formerlab.mixers.streaming import attend

    return mod.out(merge_heads(attend(mod.kernel, *mod.qkv_heads(x), None, False, False)))


def spy(monkeypatch, mod):
    calls = []
    real = mod.kernel.attend_projected
    monkeypatch.setattr(mod.kernel, "attend_projected", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("bias,conv,n", [(True, 5, 37), (False, None, 64), (True, 5, 2000)])
def test_mixer_fused_projection_equals_its_qkv_path_with_diagnostics(monkeypatch, bias, conv, n):
    # N = 2000: two row blocks of the default size
    mod = mixer(bias, conv)
    calls = spy(monkeypatch, mod)
    x = torch.randn(2, n, 24, dtype=D64, requires_grad=True)
    g = torch.randn(2, n, 24, dtype=D64)
    params = [x, *mod.parameters()]
    out = mod(x)
    assert calls == [1]
    fused_info = mod.kernel.last_info.pinv
    ref = general_path(mod, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    general_info = mod.kernel.last_info.pinv
    torch.testing.assert_close(fused_info.iterations, general_info.iterations)
    torch.testing.assert_close(fused_info.residual, general_info.residual, rtol=1e-9, atol=1e-12)


def test_mixer_fused_projection_float32_matches_the_float64_truth(monkeypatch):
    mod = mixer()
    x = torch.randn(2, 300, 24, dtype=D64)
    truth = general_path(mod, x)
    mod32 = mod.float()
    calls = spy(monkeypatch, mod32)
    out = mod32(x.float())
    assert calls == [1] and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), truth, rtol=1e-4, atol=1e-5)


def test_mixer_double_backward_through_the_fused_projection(monkeypatch):
    # a Jacobian regulariser differentiates the input gradient again (create_graph)
    mod = mixer()
    calls = spy(monkeypatch, mod)
    x = torch.randn(1, 21, 24, dtype=D64, requires_grad=True)
    v = torch.randn(1, 21, 24, dtype=D64)

    def jvp_norm(out):
        (gx,) = torch.autograd.grad(out, x, v, create_graph=True)
        return gx.square().sum()

    # (the output bias does not reach the input gradient)
    params = [mod.qkv.weight, mod.qkv.bias, mod.out.weight, mod.kernel.conv.weight]
    fused = torch.autograd.grad(jvp_norm(mod(x)), params)
    assert calls == [1]
    general = torch.autograd.grad(jvp_norm(general_path(mod, x)), params)
    for a, b in zip(fused, general):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def hooked(mod):
    seen = []
    mod.qkv.register_forward_hook(lambda *args: seen.append(1))
    return seen


@pytest.mark.parametrize("case", [
    "mask", "rope", "hook", "landmarks above head size", "selection", "bfloat16", "autocast",
    "N not above m",
])
def test_mixer_takes_the_qkv_path_where_the_fusion_does_not_apply(monkeypatch, case):
    options = {"rope": True} if case == "rope" else {}
    if case == "selection":
        options = {"pinv_select": "rows"}
    mod = mixer(m=16 if case == "landmarks above head size" else 4, **options)  # D = 8
    seen = hooked(mod) if case == "hook" else None
    calls = spy(monkeypatch, mod)
    n = 4 if case == "N not above m" else 30
    x = torch.randn(2, n, 24, dtype=D64)
    mask = torch.ones(2, n, dtype=torch.bool) if case == "mask" else None
    if case == "bfloat16":
        mod, x = mod.bfloat16(), x.bfloat16()
    if case == "autocast":
        mod, x = mod.float(), x.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mod(x)
    else:
        mod(x, mask)
    assert calls == []
    if seen is not None:
        assert seen == [1]  # the hook saw its projection run


def test_fused_projection_is_the_default_for_the_benchmarked_module(monkeypatch):
    # the configuration of `formerlab bench nystrom` (m = D = 64) takes the fused path
    mod = SelfAttention(256, 4, kernel="nystrom", num_landmarks=64, pinv_iters=6,
                        conv_kernel=33, conv_heads=4)
    calls = spy(monkeypatch, mod)
    mod(torch.randn(1, 200, 256))
    assert calls == [1]


def test_the_key_bias_cancels_in_every_softmax():
    # b_k adds a constant to each row of F's and W's scores and to each landmark's
    # scores over N in Rᵀ: every softmax ignores it (so no test can see its handling)
    x, weight, b, conv = inputs()
    other = b.clone()
    other[12:24] = torch.randn(12, generator=torch.Generator().manual_seed(5), dtype=D64) * 10
    out = nystrom_projected(x, weight, b, 3, 4, torch.linalg.pinv, 0.4, conv)
    moved = nystrom_projected(x, weight, other, 3, 4, torch.linalg.pinv, 0.4, conv)
    torch.testing.assert_close(out, moved, rtol=1e-8, atol=1e-10)
    changed_q = b.clone()
    changed_q[:12] += 1.0
    assert (nystrom_projected(x, weight, changed_q, 3, 4, torch.linalg.pinv, 0.4, conv)
            - out).abs().max() > 1e-3


def test_fused_projection_under_inference_mode_and_no_grad(monkeypatch):
    mod = mixer()
    calls = spy(monkeypatch, mod)
    x = torch.randn(2, 40, 24, dtype=D64)
    ref = mod(x)
    with torch.inference_mode():
        inf = mod(x)
    with torch.no_grad():
        plain = mod(x)
    assert calls == [1, 1, 1] and inf.grad_fn is None and plain.grad_fn is None
    torch.testing.assert_close(inf, ref, rtol=0, atol=0)
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)


@pytest.mark.parametrize("heads", [1, 4])
def test_one_head_and_many_heads_over_blocks(monkeypatch, heads):
    # H = 1 (the per-head views are then contiguous ones) and B = 3, N not a multiple of m
    monkeypatch.setattr(product, "BLOCK_ROWS", 8)
    x, weight, b, conv = inputs(b=3, n=30, c=4 * heads, heads=heads, grad=True)
    out = nystrom_projected(x, weight, b, heads, 3, torch.linalg.inv, 0.5, conv)
    ref = dense_reference(x, weight, b, heads, 3, 0.5, conv, torch.linalg.inv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=D64)
    leaves = (x, weight, b, conv)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
