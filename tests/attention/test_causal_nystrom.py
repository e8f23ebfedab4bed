"""causal_nystrom against exact causal softmax attention (the ground truth)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import attention
from formerlab.attention.causal_nystrom import DEFAULT_SEGMENT_SIZE, causal_nystrom_attention

SYSTEMS = ["block", "triangular"]


def exact(q, k, v, mask=None):
    return attention.build("softmax")(q, k, v, attention_mask=mask, causal=True)


def _qkv(b, h, n, d, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("system", SYSTEMS)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 24), d=st.integers(1, 8), seed=st.integers(0, 1000))
def test_segment_size_one_is_exact_float64(system, n, d, seed):
    q, k, v = _qkv(2, 2, n, d, seed)
    kernel = attention.build("causal_nystrom", segment_size=1, landmark_system=system)
    torch.testing.assert_close(kernel(q, k, v, causal=True), exact(q, k, v), rtol=0, atol=1e-8)


@pytest.mark.parametrize("system", SYSTEMS)
def test_segment_size_one_is_exact_float32(system):
    q, k, v = _qkv(2, 3, 40, 16, seed=1, dtype=torch.float32)
    kernel = attention.build("causal_nystrom", segment_size=1, landmark_system=system)
    out = kernel(q, k, v, causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact(q, k, v), rtol=0, atol=1e-4)


@pytest.mark.parametrize("system", SYSTEMS)
def test_one_segment_is_exact(system):
    q, k, v = _qkv(1, 2, 17, 4, seed=2)
    for s in (17, 40):
        out = attention.build("causal_nystrom", segment_size=s, landmark_system=system)(
            q, k, v, causal=True
        )
        torch.testing.assert_close(out, exact(q, k, v), rtol=0, atol=1e-10)


@pytest.mark.parametrize("system", SYSTEMS)
def test_exact_when_tokens_within_segments_are_identical(system):
    s, m = 4, 6
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(2, 2, m, 1, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    q, k, v = (t.expand(2, 2, m, s, 5).reshape(2, 2, m * s, 5) for t in base)
    out = attention.build("causal_nystrom", segment_size=s, landmark_system=system)(
        q, k, v, causal=True
    )
    torch.testing.assert_close(out, exact(q, k, v), rtol=0, atol=1e-10)


@pytest.mark.parametrize("system", SYSTEMS)
def test_exact_with_padding_inside_segments_of_identical_tokens(system):
    # landmarks are means over the *real* tokens of a segment: with identical real tokens
    # per segment the result stays exact when some of a segment's tokens are padding
    s, m = 4, 6
    g = torch.Generator().manual_seed(13)
    base = [torch.randn(2, 2, m, 1, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    q, k, v = (t.expand(2, 2, m, s, 5).reshape(2, 2, m * s, 5) for t in base)
    mask = torch.ones(2, m * s, dtype=torch.bool)
    mask[0, [1, 2, 9]] = False  # inside segments 0 and 2
    mask[1, [4, 5, 6, 13]] = False
    kernel = attention.build("causal_nystrom", segment_size=s, landmark_system=system)
    out = kernel(q, k, v, attention_mask=mask, causal=True)
    want = exact(q, k, v, mask) * mask[:, None, :, None]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)


def _block_reference(q, k, v, mask, s):
    """The block-system formula term by term (loops, float64), for one head."""
    n, scale = q.shape[0], q.shape[1] ** -0.5
    kappa = lambda x, y: torch.exp(scale * (x @ y))  # noqa: E731
    v1 = torch.cat([v, torch.ones(n, 1, dtype=v.dtype)], dim=1)
    landmarks = []
    for a in range(0, n, s):
        real = [j for j in range(a, min(a + s, n)) if mask[j]]
        if not real:
            landmarks.append(None)
            continue
        qa, ka = q[real].mean(0), k[real].mean(0)
        x = sum(kappa(qa, k[j]) / kappa(qa, ka) * v1[j] for j in real)
        landmarks.append((ka, x))
    out = torch.zeros_like(v)
    for i in range(n):
        terms = [kappa(q[i], k[j]) * v1[j] for j in range(i - i % s, i + 1) if mask[j]]
        terms += [kappa(q[i], lm[0]) * lm[1] for lm in landmarks[: i // s] if lm is not None]
        if mask[i] and terms:
            total = sum(terms)
            out[i] = total[:-1] / total[-1]
    return out


def test_block_system_matches_its_formula_with_padding_inside_segments():
    q, k, v = _qkv(1, 1, 14, 3, seed=15)
    mask = torch.ones(1, 14, dtype=torch.bool)
    mask[0, [1, 6, 7, 13]] = False
    out = attention.build("causal_nystrom", segment_size=4)(
        q, k, v, attention_mask=mask, causal=True
    )
    want = _block_reference(q[0, 0], k[0, 0], v[0, 0], mask[0], 4)
    torch.testing.assert_close(out[0, 0], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("system", SYSTEMS)
def test_queries_that_see_no_key_give_zero_not_nan(system):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 12, 4, seed=14))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :5] = False  # left padding: the first queries see no real key
    mask[1] = False  # an all-padded sequence
    kernel = attention.build("causal_nystrom", segment_size=3, landmark_system=system)
    out = kernel(q, k, v, attention_mask=mask, causal=True)
    assert torch.isfinite(out).all() and (out[0, :, :5] == 0).all() and (out[1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("system", SYSTEMS)
def test_right_padding_equals_the_unpadded_sequence(system):
    q, k, v = _qkv(2, 2, 23, 4, seed=4)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    kernel = attention.build("causal_nystrom", segment_size=4, landmark_system=system)
    out = kernel(q, k, v, attention_mask=mask, causal=True)
    short = kernel(q[1:, :, :15], k[1:, :, :15], v[1:, :, :15], causal=True)
    torch.testing.assert_close(out[1:, :, :15], short, rtol=0, atol=1e-10)
    torch.testing.assert_close(out[:1], kernel(q[:1], k[:1], v[:1], causal=True))
    assert (out[1, :, 15:] == 0).all()


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("spread", [1.0, 10.0])
def test_bf16_outputs_and_gradients_are_finite(system, spread):
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(2, 2, 90, 32, seed=5, dtype=torch.float32))
    q, k = q * spread, k * spread
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[0, 70:] = False
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kernel = attention.build("causal_nystrom", landmark_system=system)
    out = kernel(q, k, v, attention_mask=mask, causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_block_system_is_much_closer_than_local_attention_alone():
    # random (structureless) inputs: the landmark part must still help, not hurt
    q, k, v = _qkv(1, 4, 256, 32, seed=6, dtype=torch.float32)
    ref = exact(q, k, v)
    out = attention.build("causal_nystrom", segment_size=8)(q, k, v, causal=True)
    b, h, n, d = q.shape
    local = exact(*(t.reshape(b, h * 32, 8, d) for t in (q, k, v))).reshape(b, h, n, d)
    err, err_local = (out - ref).abs().mean(), (local - ref).abs().mean()
    assert err < 0.5 * err_local


def test_need_weights_is_a_causal_row_stochastic_matrix():
    q, k, v = _qkv(1, 2, 14, 4, seed=7)
    kernel = attention.build("causal_nystrom", segment_size=3)
    out, w = kernel(q, k, v, causal=True, need_weights=True)
    assert w.shape == (1, 2, 14, 14)
    torch.testing.assert_close(out, w @ v)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 14, dtype=torch.float64))
    assert (w.triu(1) == 0).all()
    assert (w >= 0).all()  # block system: every weight is a positive kernel term


def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 7, 3, seed=8))
    kernel = attention.build("causal_nystrom", segment_size=2)
    assert torch.autograd.gradcheck(lambda a, b, c: kernel(a, b, c, causal=True), (q, k, v))


def test_segment_size_defaults_and_diagnostics():
    q, k, v = _qkv(1, 1, 50, 4, seed=9)
    kernel = attention.build("causal_nystrom")
    kernel(q, k, v, causal=True)
    assert kernel.last_info["segment_size"] == DEFAULT_SEGMENT_SIZE == 32
    assert kernel.last_info["num_landmarks"] == 2  # ⌈50/32⌉, anchored at position 0
    assert kernel.diagnostics() == {"fallback_fraction": 0.0}
    # the default never depends on N
    kernel(*_qkv(1, 1, 2000, 4, seed=9), causal=True)
    assert kernel.last_info["segment_size"] == 32
    # num_landmarks keeps its meaning for bidirectional use only
    kernel = attention.build("causal_nystrom", num_landmarks=5)
    kernel(q, k, v, causal=False)
    assert kernel.last_info["num_landmarks"] == 5 and kernel.last_info["segment_size"] == 10
    _, info = causal_nystrom_attention(q, k, v, 7)
    assert info["num_landmarks"] == math.ceil(50 / 7)


def test_num_landmarks_is_refused_for_causal_use():
    q, k, v = _qkv(1, 1, 20, 4, seed=9)
    kernel = attention.build("causal_nystrom", num_landmarks=4)
    with pytest.raises(ValueError, match="num_landmarks=4.*prefix consistent.*segment_size"):
        kernel(q, k, v, causal=True)
    with pytest.raises(ValueError, match="num_landmarks"):
        kernel.init_state(1, 1, 4)


def test_default_is_prefix_consistent_where_sqrt_n_was_not():
    # the old ⌈√N⌉ segments: N = 20 vs N = 40 moved positions 0-19 by up to 0.71 with s = ⌈√N⌉
    q, k, v = _qkv(2, 2, 40, 4, seed=12)
    kernel = attention.build("causal_nystrom", segment_size=4)  # exercises landmarks
    full = kernel(q, k, v, causal=True)
    part = kernel(q[:, :, :20], k[:, :, :20], v[:, :, :20], causal=True)
    torch.testing.assert_close(part, full[:, :, :20], rtol=0, atol=1e-12)
    sqrt_20 = causal_nystrom_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], 5)[0]
    sqrt_40 = causal_nystrom_attention(q, k, v, 7)[0][:, :, :20]
    assert (sqrt_20 - sqrt_40).abs().max() > 1e-2  # a length-derived s is not


def test_triangular_breakdown_falls_back_and_is_reported():
    q, k, v = _qkv(1, 2, 120, 16, seed=10, dtype=torch.float32, scale=4.0)
    kernel = attention.build("causal_nystrom", segment_size=2, landmark_system="triangular")
    out = kernel(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert 0.0 < kernel.diagnostics()["fallback_fraction"] <= 1.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="segment_size"):
        attention.build("causal_nystrom", segment_size=0)
    with pytest.raises(ValueError, match="num_landmarks"):
        attention.build("causal_nystrom", num_landmarks=-1)
    with pytest.raises(ValueError, match="not both"):
        attention.build("causal_nystrom", segment_size=2, num_landmarks=2)
    with pytest.raises(ValueError, match="landmark_system"):
        attention.build("causal_nystrom", landmark_system="dense")
    with pytest.raises(ValueError, match="unknown option"):
        attention.build("causal_nystrom", segments=2)
    q, k, v = _qkv(1, 1, 4, 2, seed=0)
    with pytest.raises(ValueError, match="causal=True only"):
        attention.build("causal_nystrom", landmark_system="triangular")(q, k, v, causal=False)


def test_bidirectional_block_variant():
    q, k, v = _qkv(2, 2, 13, 4, seed=11)
    full = attention.build("softmax")
    for s in (1, 13):  # exact at both ends
        out = attention.build("causal_nystrom", segment_size=s)(q, k, v, causal=False)
        torch.testing.assert_close(out, full(q, k, v), rtol=0, atol=1e-10)
    out, w = attention.build("causal_nystrom", segment_size=3)(q, k, v, need_weights=True)
    torch.testing.assert_close(out, w @ v)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 13, dtype=torch.float64))
    assert (w.triu(1) > 0).any()  # sees the future, as it should without a causal mask
