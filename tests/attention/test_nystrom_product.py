"""The fused unpadded Nyström path (``nystrom_product``), the convolution skip's own
backward and the qkv split: each against ground truth built here from first principles
(dense matrices, shifted sums) or against the independent general code path."""

import pytest
import torch

from formerlab.attention.conv_skip import depthwise_conv_seq
from formerlab.attention.nystrom import NystromAttention
from formerlab.attention.nystrom_product import nystrom_product
from formerlab.mixers.self_attention import SelfAttention, _SplitQKV

D64 = torch.float64


def qkv(b=2, h=2, n=37, d=5, dtype=D64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=D64).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def segment_matrix(n: int, m: int) -> torch.Tensor:
    """(m, N) mean over segment floor(r·m/N), written out densely."""
    S = torch.zeros(m, n, dtype=D64)
    for r in range(n):
        S[r * m // n, r] = 1.0
    return S / S.sum(-1, keepdim=True)


def dense_nystrom(q, k, v, m, scale):
    """F · pinv(W) · R · V from explicit matrices (exact pseudoinverse)."""
    S = segment_matrix(q.shape[-2], m)
    ql, kl = S @ q * scale, S @ k
    F = (q * scale @ kl.mT).softmax(-1)
    W = (ql @ kl.mT).softmax(-1)
    R = (ql @ k.mT).softmax(-1)
    return F @ torch.linalg.pinv(W) @ R @ v


@pytest.mark.parametrize("n,m", [(37, 4), (64, 8), (9, 8)])
def test_product_equals_dense_formula_with_the_exact_inverse(n, m):
    q, k, v = qkv(n=n)
    out = nystrom_product(q, k, v, m, torch.linalg.pinv, 0.4)
    torch.testing.assert_close(out, dense_nystrom(q, k, v, m, 0.4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,m", [(7, 2), (8, 2)])
def test_product_gradcheck_and_gradgradcheck(n, m):
    q, k, v = qkv(b=1, h=2, n=n, d=2, requires_grad=True)

    def f(q, k, v):
        return nystrom_product(q, k, v, m, torch.linalg.pinv, 0.7)

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))  # the create_graph recompute path
    # gradgradcheck is self-consistent on the recomputed function: its first derivative
    # must also be the hand-written one, or a wrong recompute would pass
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=D64)
    plain = torch.autograd.grad(f(q, k, v), (q, k, v), g)
    graphed = torch.autograd.grad(f(q, k, v), (q, k, v), g, create_graph=True)
    for a, b in zip(plain, graphed):
        assert b.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,block", [(37, 16), (64, 16), (33, 32), (64, 24)])
def test_blocked_backward_equals_the_dense_gradient(monkeypatch, n, block):
    # forward and backward run over row blocks (the last one ragged for 37 and 33; blocks
    # across segment boundaries for 64 in 24s): output and gradient against the dense
    # formula, and gradcheck with several blocks
    import importlib

    product = importlib.import_module("formerlab.attention.nystrom_product")
    monkeypatch.setattr(product, "BLOCK_ROWS", block)
    q, k, v = qkv(n=n, requires_grad=True)
    out, dense = nystrom_product(q, k, v, 4, torch.linalg.pinv, 0.4), dense_nystrom(q, k, v, 4, 0.4)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=D64)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(dense, (q, k, v), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    small = [t.detach()[:1, :, :n, :2].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: nystrom_product(q, k, v, 3, torch.linalg.pinv, 0.7), small)


def run(kern, q, k, v, mask):
    out, _ = kern.attend(q, k, v, mask, False, False)
    return out


@pytest.mark.parametrize("n,m", [(37, 4), (64, 8), (9, 8)])
@pytest.mark.parametrize("options", [
    dict(pinv_iters=6),
    dict(pinv_iters=6, conv_kernel=5, conv_heads=2),
    dict(pinv_iters=None, pinv_tol=1e-8, pinv_backward="implicit"),
    dict(pinv_reg="tikhonov", conv_kernel=3),
])
def test_fused_path_matches_the_general_path_forward_and_backward(n, m, options):
    # an all-True mask sends the same call down the general (landmark_factors) path
    kern = NystromAttention(num_landmarks=m, **options).double()
    q, k, v = qkv(n=n, requires_grad=True)
    mask = torch.ones(2, n, dtype=torch.bool)
    fused, general = run(kern, q, k, v, None), run(kern, q, k, v, mask)
    torch.testing.assert_close(fused, general, rtol=1e-9, atol=1e-11)
    params = [q, k, v] + list(kern.parameters())
    g = torch.randn(fused.shape, generator=torch.Generator().manual_seed(1), dtype=D64)
    # the implicit derivative is that of A⁺, evaluated at an iterate certified within
    # tol = 1e-8: the landmarks' rounding (scaled before or after the mean) can move the
    # stopping iteration, so the two paths agree to ~tol there, to rounding elsewhere
    implicit = options.get("pinv_backward") == "implicit"
    rtol, atol = (1e-5, 1e-7) if implicit else (1e-8, 1e-10)
    for a, b in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(general, params, g)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_fused_path_keeps_the_pinv_diagnostics():
    kern = NystromAttention(num_landmarks=8, pinv_iters=6)
    q, k, v = qkv(n=40, dtype=torch.float32)
    kern.attend(q, k, v, None, False, False)
    fused = kern.last_info.pinv
    kern.attend(q, k, v, torch.ones(2, 40, dtype=torch.bool), False, False)
    general = kern.last_info.pinv
    assert fused.iterations.shape == (2, 2)
    assert torch.equal(fused.iterations, general.iterations)
    assert torch.equal(fused.converged, general.converged)
    torch.testing.assert_close(fused.bound, general.bound)
    assert kern.diagnostics()["pinv_iterations"] == 6


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    q, k, v = qkv(n=20, requires_grad=True)
    out = nystrom_product(q, k, v, 4, torch.linalg.pinv, 0.5)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    q, k, v = qkv(n=70, d=8, dtype=torch.float32)
    kern = NystromAttention(num_landmarks=8, pinv_iters=6, conv_kernel=3)
    ref = kern(q, k, v)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = kern(*low)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in low)


def test_inference_mode_builds_no_graph():
    q, k, v = qkv(n=30, dtype=torch.float32)
    with torch.no_grad():
        out = nystrom_product(q, k, v, 4, torch.linalg.pinv, 0.3)
    assert not out.requires_grad


def test_product_refuses_sequences_not_longer_than_m():
    q, k, v = qkv(n=4)
    with pytest.raises(ValueError, match="N > num_landmarks; got N=4, num_landmarks=4"):
        nystrom_product(q, k, v, 4, torch.linalg.pinv, 1.0)


@pytest.mark.parametrize("n,block", [(37, 16), (64, 64), (40, 24)])
def test_product_with_the_conv_skip_fused_equals_the_dense_formula_plus_shifted_sums(
    monkeypatch, n, block
):
    # the skip's sum and its dv are added block by block (ragged and segment-crossing
    # blocks here); the ground truth is the dense formula plus the convolution as shifts
    import importlib

    product = importlib.import_module("formerlab.attention.nystrom_product")
    monkeypatch.setattr(product, "BLOCK_ROWS", block)
    q, k, v = qkv(n=n, requires_grad=True)
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(4), dtype=D64, requires_grad=True)
    out = nystrom_product(q, k, v, 4, torch.linalg.pinv, 0.4, conv_weight=w)
    dense = dense_nystrom(q, k, v, 4, 0.4) + shifted_sum_conv(v, w)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=D64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, w), g),
                    torch.autograd.grad(dense, (q, k, v, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_product_with_the_conv_skip_gradcheck_and_gradgradcheck():
    q, k, v = qkv(b=1, h=2, n=7, d=2, requires_grad=True)
    w = torch.randn(2, 3, dtype=D64, requires_grad=True)

    def f(q, k, v, w):
        return nystrom_product(q, k, v, 2, torch.linalg.pinv, 0.7, conv_weight=w)

    assert torch.autograd.gradcheck(f, (q, k, v, w))
    assert torch.autograd.gradgradcheck(f, (q, k, v, w))
    # only the filters trainable: their gradient alone
    got = torch.autograd.grad(f(q.detach(), k.detach(), v.detach(), w).sum(), w)[0]
    ref = torch.autograd.grad(shifted_sum_conv(v.detach(), w).sum(), w)[0]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4), (2,)])
def test_product_refuses_conv_weights_of_the_wrong_shape(shape):
    q, k, v = qkv(n=9)
    with pytest.raises(ValueError, match=r"conv_weight has shape .*; expected \(2, K\) with K odd"):
        nystrom_product(q, k, v, 4, torch.linalg.pinv, 1.0, conv_weight=torch.ones(shape, dtype=D64))


def shifted_sum_conv(v, w):
    """out[n] = Σ_t w[t]·v[n + t − K//2], zero padded, as an explicit sum of shifts."""
    p = w.shape[-1] // 2
    vp = torch.nn.functional.pad(v, (0, 0, p, p))
    n = v.shape[-2]
    return sum(w[None, :, t, None, None] * vp[:, :, t:t + n] for t in range(w.shape[-1]))


@pytest.mark.parametrize("n,ksize", [(1, 3), (50, 33), (17, 5), (8, 9)])
def test_conv_skip_forward_and_both_gradients_match_shifted_sums(n, ksize):
    v = torch.randn(2, 3, n, 4, dtype=D64, requires_grad=True)
    w = torch.randn(3, ksize, dtype=D64, requires_grad=True)
    out, ref = depthwise_conv_seq(v, w), shifted_sum_conv(v, w)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (v, w), g), torch.autograd.grad(ref, (v, w), g)):
        torch.testing.assert_close(a, b)


def test_conv_skip_takes_an_upstream_gradient_of_any_layout():
    # the hand-written backward views the gradient with canonical channels-last strides
    v = torch.randn(2, 3, 40, 4, dtype=D64, requires_grad=True)
    w = torch.randn(3, 7, dtype=D64, requires_grad=True)
    g = torch.randn(2, 4, 40, 3, dtype=D64).permute(0, 3, 2, 1)  # (B, H, N, D), strided
    ref = shifted_sum_conv(v, w)
    got = torch.autograd.grad(depthwise_conv_seq(v, w), (v, w), g)
    for a, b in zip(got, torch.autograd.grad(ref, (v, w), g)):
        torch.testing.assert_close(a, b)
    # the autograd function itself, handed a transposed gradient
    from formerlab.attention.conv_skip import _SequenceConv

    x = v.detach().transpose(1, 2).reshape(2, 40, 12).requires_grad_()
    wc = w.detach().repeat_interleave(4, dim=0).requires_grad_()
    g2 = torch.randn(2, 12, 40, dtype=D64).mT
    got = torch.autograd.grad(_SequenceConv.apply(x, wc), (x, wc), g2)
    plain = torch.nn.functional.conv1d(x.mT, wc[:, None], padding=3, groups=12).mT
    for a, b in zip(got, torch.autograd.grad(plain, (x, wc), g2)):
        torch.testing.assert_close(a, b)


def test_conv_skip_double_backward_and_strided_input():
    base = torch.randn(1, 9, 3 * 2 * 3, dtype=D64, requires_grad=True)
    w = torch.randn(2, 5, dtype=D64, requires_grad=True)

    def f(base, w):  # v as the strided per-head view of a packed projection
        v = base[..., 6:12].view(1, 9, 2, 3).transpose(1, 2)
        return depthwise_conv_seq(v, w)

    assert torch.autograd.gradcheck(f, (base, w))
    assert torch.autograd.gradgradcheck(f, (base, w))
    g = torch.randn(1, 2, 9, 3, dtype=D64)  # the recompute's first derivative, too
    plain = torch.autograd.grad(f(base, w), (base, w), g)
    graphed = torch.autograd.grad(f(base, w), (base, w), g, create_graph=True)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_split_qkv_gradients_land_in_one_buffer():
    x = torch.randn(2, 5, 24, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _SplitQKV.apply(x, 2), (x,))
    q, k, v = _SplitQKV.apply(x, 2)
    (3 * q.sum() + v.square().sum()).backward()  # k unused: its block gets zeros
    assert torch.equal(x.grad[..., :8], torch.full_like(x.grad[..., :8], 3.0))
    assert torch.equal(x.grad[..., 8:16], torch.zeros_like(x.grad[..., 8:16]))
    torch.testing.assert_close(x.grad[..., 16:], 2 * x.detach()[..., 16:])


def test_self_attention_gradients_equal_the_chunk_reference():
    mixer = SelfAttention(16, 2, kernel="nystrom", num_landmarks=4, conv_kernel=3).double()
    x = torch.randn(2, 21, 16, dtype=D64, requires_grad=True)
    out = mixer(x)
    q, k, v = (t.view(2, 21, 2, 8).transpose(1, 2) for t in mixer.qkv(x).chunk(3, -1))
    ref = mixer.out(mixer.kernel(q, k, v).transpose(1, 2).reshape(2, 21, 16))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = [x] + list(mixer.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_runs_forward_and_backward():
    # the fused product and the conv skip turn autocast off inside (their backward needs
    # the forward's dtypes); the projections still run in bf16
    torch.manual_seed(0)
    mixer = SelfAttention(32, 2, kernel="nystrom", num_landmarks=4, conv_kernel=3)
    x = torch.randn(2, 30, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    grad_bf16 = x.grad.clone()
    x.grad = None
    ref = mixer(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)
    assert torch.nn.functional.cosine_similarity(grad_bf16.flatten(), x.grad.flatten(), 0) > 0.99


def test_split_qkv_head_by_head_copy_for_long_sequences():
    # N·D >= 2^16 takes the per-head copy path; the gradient must equal the plain chunk's
    x = torch.randn(1, 2048, 3 * 2 * 32, requires_grad=True)
    grads = [torch.randn(1, 2, 2048, 32) for _ in range(3)]
    torch.autograd.backward(_SplitQKV.apply(x, 2), grads)
    ref = torch.cat([g.transpose(1, 2).reshape(1, 2048, 64) for g in grads], dim=-1)
    assert torch.equal(x.grad, ref)


def test_conv_skip_weight_of_another_dtype_gets_its_gradient_in_its_own_dtype():
    # float64 values, float32 filter: the backward used to meet the uncast filter and fail
    v = torch.randn(1, 2, 9, 3, dtype=D64, requires_grad=True)
    w = torch.randn(2, 5, requires_grad=True)
    out = depthwise_conv_seq(v, w)
    g = torch.randn_like(out)
    gv, gw = torch.autograd.grad(out, (v, w), g)
    ref = shifted_sum_conv(v, w.double())
    rv, rw = torch.autograd.grad(ref, (v, w), g)
    assert out.dtype == D64 and gw.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gw, rw)


def test_packed_buffer_recognises_exactly_the_views_of_one_projection():
    from formerlab.attention.packed_qkv import empty_grads, packed_buffer
    from formerlab.mixers.self_attention import split_heads

    for b, h in [(2, 3), (1, 1)]:  # size-1 dimensions have strides that select nothing
        buf = torch.randn(b, 7, 3 * h * 4)
        q, k, v = (split_heads(t, h) for t in buf.chunk(3, dim=-1))
        got = packed_buffer(q, k, v)
        assert got is not None and got.data_ptr() == buf.data_ptr() and torch.equal(got, buf)
        assert packed_buffer(k, q, v) is None  # another order is another layout
        assert packed_buffer(q, k, None) is None
        assert packed_buffer(q.contiguous(), k, v) is None  # a copy is not a view
        other = torch.randn_like(buf)
        assert packed_buffer(q, k, split_heads(other.chunk(3, dim=-1)[2], h)) is None
        grads = empty_grads(q.contiguous(), packed=True)
        assert packed_buffer(*grads) is not None
        assert all(g.is_contiguous() for g in empty_grads(q, packed=False))
    wide = torch.randn(2, 7, 4 * 2 * 4)  # a fourth slot: the three are not the whole row
    q, k, v = (split_heads(t, 2) for t in wide.chunk(4, dim=-1)[:3])
    assert packed_buffer(q, k, v) is None


@pytest.mark.parametrize("conv", [None, 3])
@pytest.mark.parametrize("n", [21, 24])
def test_self_attention_takes_the_kernels_gradient_buffer_and_matches_the_general_path(
    monkeypatch, conv, n
):
    # the fused kernel writes dq, dk, dv as views of one buffer and the split passes it on
    # (recorded below); the gradients must equal the general path's (all-True mask), which
    # goes through the split's copying branch. N = 24: whole segments of 6 (the landmark
    # gradients spread in the buffer's token-major order). A (no-op) hook on the projection
    # keeps the mixer on the q, k, v path: unhooked, it fuses the projection
    # (tests/attention/test_nystrom_projected.py)
    import formerlab.mixers.self_attention as sa
    from formerlab.attention.packed_qkv import packed_buffer

    taken = []

    def recording(*grads):
        found = packed_buffer(*grads)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(sa, "packed_buffer", recording)
    torch.manual_seed(0)
    mixer = SelfAttention(16, 2, kernel="nystrom", num_landmarks=4, conv_kernel=conv,
                          conv_heads=2 if conv else None).double()
    mixer.qkv.register_forward_hook(lambda *args: None)
    x = torch.randn(2, n, 16, dtype=D64, requires_grad=True)
    g = torch.randn(2, n, 16, dtype=D64)
    params = [x] + list(mixer.parameters())
    fused = torch.autograd.grad(mixer(x), params, g)
    assert taken == [True]
    general = torch.autograd.grad(mixer(x, torch.ones(2, n, dtype=torch.bool)), params, g)
    assert taken == [True, False]
    for a, b in zip(fused, general):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_keys_softmax_over_blocks_with_a_moving_maximum(monkeypatch, direction):
    # R's softmax over N runs block by block with a running maximum: key norms that grow
    # (or shrink) along the sequence move each landmark's maximum by hundreds between
    # blocks, where a missing rescale of the earlier sums, or exp without the shift, fails
    import importlib

    product = importlib.import_module("formerlab.attention.nystrom_product")
    monkeypatch.setattr(product, "BLOCK_ROWS", 8)
    q, k, v = qkv(n=40, d=4)
    ramp = torch.linspace(0.0, 1.0, 40, dtype=D64)
    k = (k * (1 + 200 * (ramp if direction > 0 else ramp.flip(0)))[:, None]).requires_grad_()
    q, v = q.requires_grad_(), v.requires_grad_()
    S = segment_matrix(40, 4)
    R = (S @ q * 2.0 @ k.mT).softmax(-1)  # (m, N): the softmax over the keys
    # the scores of one landmark span more than 710: exp without a shift over- or underflows
    assert R.detach().log().neg().max() > 710

    def same(W):  # any differentiable inverse: W itself keeps the reference well-posed
        return W

    out = nystrom_product(q, k, v, 4, same, 2.0)
    dense = (q * 2.0 @ (S @ k).mT).softmax(-1) @ (S @ q * 2.0 @ (S @ k).mT).softmax(-1) @ R @ v
    torch.testing.assert_close(out, dense, rtol=1e-9, atol=1e-11)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=D64)
    ref = torch.autograd.grad(dense, (q, k, v), g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    # float32, where exp overflows above 88: the same inputs against the float64 reference
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32 = nystrom_product(q32, k32, v32, 4, same, 2.0)
    torch.testing.assert_close(out32.double(), dense, rtol=2e-4, atol=1e-5)
    got = torch.autograd.grad(out32, (q32, k32, v32), g.float())
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert (a.double() - b).norm() <= 1e-3 * b.norm()
