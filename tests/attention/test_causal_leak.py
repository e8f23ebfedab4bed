"""Every kernel that claims causal support is leak-tested, automatically.

The parametrisation reads ``formerlab.attention.available(causal=True)``: a newly
registered causal kernel is tested here without anyone adding a test. The checker
itself (formerlab.testing) is tested first against functions with known leaks.
"""

import pytest
import torch

from formerlab import attention
from formerlab.testing import assert_no_future_leak, check_future_leak

CAUSAL = attention.available(causal=True)
NON_CAUSAL = sorted(set(attention.available()) - set(CAUSAL))

# extra option sets that exercise other code paths of some kernels (chunk and segment
# boundaries inside the sequence, the triangular landmark system)
VARIANTS = [
    ("causal_nystrom", {"segment_size": 1}),
    ("causal_nystrom", {"segment_size": 3}),
    ("causal_nystrom", {"segment_size": 3, "landmark_system": "triangular"}),
    ("causal_nystrom", {"segment_size": 4, "landmark_system": "triangular"}),
    ("linear", {"chunk_size": 4}),
    ("linear", {"chunk_size": 3, "feature_map": "relu"}),
    ("performer", {"chunk_size": 4, "num_features": 16}),
]


def _qkv(b=2, h=2, n=11, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def _every_position(n):
    return range(n - 1)


# --- the checker itself -----------------------------------------------------------


def test_checker_passes_a_causal_function():
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    report = assert_no_future_leak(lambda t: t.cumsum(1) * 2.0, [x], seq_dim=1)
    assert report.max_value_leak == 0.0 and report.max_grad_leak == 0.0


def test_checker_catches_a_value_leak():
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="moved by"):
        assert_no_future_leak(lambda t: t.flip(1).cumsum(1).flip(1), [x], seq_dim=1)


def test_checker_catches_a_gradient_only_leak():
    # the future moves the past by 1e-10 only (within atol) but the gradient is not 0
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    leaky = lambda t: t + 1e-10 * t.sum(1, keepdim=True)  # noqa: E731
    report = check_future_leak(leaky, [x], seq_dim=1)
    assert report.max_value_leak < 1e-6
    with pytest.raises(AssertionError, match="gradient"):
        assert_no_future_leak(leaky, [x], seq_dim=1)


def test_checker_catches_non_causal_softmax_on_bhnd():
    kernel = attention.build("softmax")
    with pytest.raises(AssertionError):
        assert_no_future_leak(lambda q, k, v: kernel(q, k, v, causal=False), _qkv(), seq_dim=2)


def test_checker_handles_integer_and_mask_inputs():
    ids = torch.randint(0, 5, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    emb = torch.randn(5, 3, dtype=torch.float64)
    fn = lambda i, m: (emb[i] * m[..., None]).cumsum(1)  # noqa: E731
    assert_no_future_leak(fn, [ids, mask], seq_dim=1, check_grad=False, perturb_masks=True)
    with pytest.raises(AssertionError):
        assert_no_future_leak(lambda i: emb[i].flip(1), [ids], seq_dim=1, check_grad=False)


def test_checker_rejects_bad_arguments():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="positions"):
        check_future_leak(lambda t: t, [x], positions=[4])
    with pytest.raises(ValueError, match="sequence length"):
        check_future_leak(lambda a, b: a, [x, torch.randn(2, 4, 3)])


# --- every causal kernel ----------------------------------------------------------


def test_registry_lists_the_causal_kernels():
    for name in ("softmax", "linear", "performer", "causal_nystrom"):
        assert name in CAUSAL
    assert "double_softmax" in NON_CAUSAL
    for name in CAUSAL:
        assert attention.build(name).supports_causal


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_kernel_does_not_leak(name):
    kernel = attention.build(name)
    q, k, v = _qkv(n=40)  # spans two default causal_nystrom segments (s = 32)
    assert_no_future_leak(
        lambda q, k, v: kernel(q, k, v, causal=True),
        [q, k, v],
        seq_dim=2,
        positions=_every_position(q.shape[2]),
    )


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_kernel_does_not_leak_with_right_padding(name):
    kernel = attention.build(name)
    q, k, v = _qkv(n=10, seed=1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    assert_no_future_leak(
        lambda q, k, v, m: kernel(q, k, v, attention_mask=m, causal=True),
        [q, k, v, mask],
        seq_dim=[2, 2, 2, 1],
        out_seq_dim=2,
        positions=_every_position(10),
        perturb_masks=True,
    )


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_kernel_does_not_leak_in_float32(name):
    kernel = attention.build(name)
    q, k, v = _qkv(n=9, d=8, seed=2, dtype=torch.float32)
    assert_no_future_leak(
        lambda q, k, v: kernel(q, k, v, causal=True), [q, k, v], seq_dim=2, atol=1e-6
    )


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=lambda p: str(p))
def test_kernel_variants_do_not_leak(name, options):
    kernel = attention.build(name, **options)
    q, k, v = _qkv(n=13, seed=3)
    assert_no_future_leak(
        lambda q, k, v: kernel(q, k, v, causal=True),
        [q, k, v],
        seq_dim=2,
        positions=_every_position(13),
    )


@pytest.mark.parametrize("name", NON_CAUSAL)
def test_non_causal_kernels_refuse_causal_and_name_alternatives(name):
    kernel = attention.build(name)
    with pytest.raises(ValueError, match="causal") as err:
        kernel(*_qkv(), causal=True)
    assert "linear" in str(err.value) and "causal_nystrom" in str(err.value)
