"""Hedgehog feature maps and (gated) Hedgehog attention against explicit references.

References: the quadratic form φ(q)φ(k)ᵀ, masked causally and by padding, normalised per
row and applied to v, computed here with plain tensor ops; for the gate, the recurrence
S_t = γ_t S_{t-1} + φ(k_t)[v_t, 1]ᵀ stepped token by token in float64.
"""

import pytest
import torch

from formerlab.attention.hedgehog import HedgehogAttention, HedgehogFeatureMap

B, H, N, D = 2, 3, 11, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread (a second one only waits for a core on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _qkv(n=N, d=D, e=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, size, generator=g, dtype=dtype) for size in (d, d, e))


def _perturbed(kernel, seed=1, scale=0.5):
    """Move every parameter away from its (identity / constant) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return kernel


def _features_by_hand(fmap, x):
    """[softmax(z), softmax(-z)] with z = W_hᵀx + b_h, one head at a time."""
    out = []
    for h in range(fmap.heads):
        z = x[:, h] @ fmap.weight[h].to(x.dtype) + fmap.bias[h].to(x.dtype)
        out.append(torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1))
    return torch.stack(out, 1)


def _quadratic(phi_q, phi_k, v, mask=None, causal=True):
    scores = torch.einsum("bhif,bhjf->bhij", phi_q, phi_k)
    n = scores.shape[-1]
    if causal:
        scores = scores * torch.tril(torch.ones(n, n, dtype=scores.dtype))
    if mask is not None:
        scores = scores * mask[:, None, None, :].to(scores.dtype)
    return torch.einsum("bhij,bhje->bhie", scores / scores.sum(-1, keepdim=True), v)


def test_feature_map_shape_positivity_and_halves_that_sum_to_one():
    fmap = _perturbed(HedgehogFeatureMap(H, D, feature_dim=6).double())
    x = _qkv()[0] * 4  # large inputs: softmax must not overflow
    phi = fmap(x)
    assert phi.shape == (B, H, N, 12) and phi.dtype == torch.float64
    assert bool((phi > 0).all())
    torch.testing.assert_close(phi[..., :6].sum(-1), torch.ones(B, H, N, dtype=torch.float64))
    torch.testing.assert_close(phi[..., 6:].sum(-1), torch.ones(B, H, N, dtype=torch.float64))
    torch.testing.assert_close(phi, _features_by_hand(fmap, x), rtol=1e-12, atol=1e-14)


def test_each_head_has_its_own_map():
    fmap = HedgehogFeatureMap(H, D).double()
    x = _qkv()[0]
    before = fmap(x)
    with torch.no_grad():
        fmap.weight[1].mul_(3.0)
    after = fmap(x)
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.allclose(before[:, 1], after[:, 1])


def test_feature_map_starts_at_the_identity_map():
    fmap = HedgehogFeatureMap(H, D).double()
    x = _qkv()[0]
    expected = torch.cat([x.softmax(-1), (-x).softmax(-1)], -1)
    torch.testing.assert_close(fmap(x), expected, rtol=1e-12, atol=1e-14)


def test_feature_map_gradcheck_float64():
    fmap = _perturbed(HedgehogFeatureMap(2, 3, feature_dim=4).double())
    x = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: _apply(fmap, x, w, b), (x, fmap.weight, fmap.bias)
    )


def _apply(fmap, x, w, b):
    # run the module with the given leaves as its parameters (gradcheck perturbs them)
    return torch.func.functional_call(fmap, {"weight": w, "bias": b}, (x,))


def test_feature_map_returns_the_input_dtype_and_computes_in_float32():
    fmap = _perturbed(HedgehogFeatureMap(H, D))
    x = _qkv(dtype=torch.float32)[0]
    out = fmap(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fmap(x.bfloat16().float()), atol=4e-3, rtol=1e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_the_explicit_quadratic_form(causal):
    kernel = _perturbed(HedgehogAttention(H, D, feature_dim=3).double())
    q, k, v = _qkv()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, -3:] = False  # right padding of row 1
    out = kernel(q, k, v, attention_mask=mask, causal=causal)
    ref = _quadratic(kernel.phi_q(q), kernel.phi_k(k), v, mask, causal)
    ref = ref * mask[:, None, :, None]  # padded queries give 0
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    _, weights = kernel(q, k, v, causal=causal, need_weights=True)
    torch.testing.assert_close(weights @ v, kernel(q, k, v, causal=causal), rtol=1e-10, atol=1e-12)


def _gated_recurrence(kernel, q, k, v):
    """Token by token: S_t = γ_t S_{t-1} + φ(k_t)[v_t, 1]ᵀ, out_t = φ(q_t)S_t / normaliser."""
    phi_q, phi_k = kernel.phi_q(q), kernel.phi_k(k)
    gamma = torch.sigmoid(
        torch.einsum("bhnd,hd->bhn", k, kernel.gate.weight.double())
        + kernel.gate.bias.double()[:, None]
    )
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    state = torch.zeros(B, H, phi_k.shape[-1], v1.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(q.shape[2]):
        state = gamma[:, :, t, None, None] * state + phi_k[:, :, t, :, None] * v1[:, :, t, None, :]
        s = torch.einsum("bhf,bhfe->bhe", phi_q[:, :, t], state)
        outs.append(s[..., :-1] / s[..., -1:])
    return torch.stack(outs, 2)


def test_gated_attention_equals_its_recurrence():
    kernel = _perturbed(HedgehogAttention(H, D, gate=True, gate_init=1.0).double())
    q, k, v = _qkv(seed=3)
    out = kernel(q, k, v, causal=True)
    torch.testing.assert_close(out, _gated_recurrence(kernel, q, k, v), rtol=1e-10, atol=1e-12)


def test_gate_starts_near_one_and_refuses_a_bidirectional_call():
    kernel = HedgehogAttention(H, D, gate=True).double()
    plain = HedgehogAttention(H, D).double()
    q, k, v = _qkv()
    # gate_init=6: γ = sigmoid(6) ≈ 0.9975, so over 11 tokens close to the ungated kernel
    with torch.no_grad():
        gap = (kernel(q, k, v, causal=True) - plain(q, k, v, causal=True)).abs().max()
    assert float(gap) < 0.05
    with pytest.raises(ValueError, match="causally only"):
        kernel(q, k, v, causal=False)


@pytest.mark.parametrize("gate", [False, True])
def test_streaming_equals_the_parallel_call_and_keeps_its_state(gate):
    kernel = _perturbed(HedgehogAttention(H, D, gate=gate, gate_init=2.0).double())
    q, k, v = _qkv(n=40, seed=4)
    ref = kernel(q, k, v, causal=True)
    state = kernel.init_state(B, H, D, dtype=torch.float64, value_dim=v.shape[-1])
    outs = []
    for a, z in [(0, 1), (1, 9), (9, 10), (10, 40)]:
        kv_before = state.kv.clone()
        out, new = kernel.step(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], state)
        assert torch.equal(state.kv, kv_before)  # a state is a value
        outs.append(out)
        state = new
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=1e-10, atol=1e-12)
    assert state.length == 40


@pytest.mark.parametrize("gate", [False, True])
def test_left_padded_row_equals_the_row_alone(gate):
    kernel = _perturbed(HedgehogAttention(H, D, gate=gate, gate_init=2.0).double())
    q, k, v = _qkv(seed=5)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :4] = False
    out = kernel(q, k, v, attention_mask=mask, causal=True)
    alone = kernel(q[:1, :, 4:], k[:1, :, 4:], v[:1, :, 4:], causal=True)
    torch.testing.assert_close(out[:1, :, 4:], alone, rtol=1e-10, atol=1e-12)
    assert bool((out[0, :, :4] == 0).all())


def test_float32_and_bfloat16_inputs_return_their_dtype():
    kernel = _perturbed(HedgehogAttention(H, D, gate=True))
    q, k, v = _qkv(dtype=torch.float32)
    ref = kernel.double()(q.double(), k.double(), v.double(), causal=True)
    kernel.float()
    out = kernel(q, k, v, causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True).dtype == torch.bfloat16


def test_bad_sizes_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="heads=0"):
        HedgehogAttention(0, D)
    with pytest.raises(ValueError, match="feature_dim=-1"):
        HedgehogFeatureMap(H, D, feature_dim=-1)
    kernel = HedgehogAttention(H, D)
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"H=3, N, D=4"):
        kernel(q[:, :2], k[:, :2], v[:, :2], causal=True)
    state = kernel.init_state(B, 2, D, value_dim=5)  # a state of another head count ...
    with pytest.raises(ValueError, match=r"H=3, N, D=4"):  # ... steps only heads it was built for
        kernel.step(q[:, :2, :1], k[:, :2, :1], v[:, :2, :1], state)
