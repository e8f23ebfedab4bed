"""Every causal kernel is prefix consistent with its default options, automatically.

out(x[:n])[:n] == out(x)[:n] for every n, and right padding with junk leaves the real
positions equal to the sequence alone. The parametrisation reads
``formerlab.attention.available(causal=True)``: a newly registered causal kernel is
checked here without anyone adding a test. The checker is tested first on functions
with known defects (including a segmentation derived from the length N).
"""

import math

import pytest
import torch

from formerlab import attention
from formerlab.attention.causal_nystrom import causal_nystrom_attention
from formerlab.testing import assert_prefix_consistent, check_prefix_consistency

CAUSAL = attention.available(causal=True)

# other code paths: segment boundaries, the triangular landmark system, chunk boundaries
VARIANTS = [
    ("causal_nystrom", {"segment_size": 1}),
    ("causal_nystrom", {"segment_size": 3}),
    ("causal_nystrom", {"segment_size": 4, "landmark_system": "triangular"}),
    ("linear", {"chunk_size": 4}),
    ("linear", {"chunk_size": 3, "feature_map": "relu"}),
    ("performer", {"chunk_size": 4, "num_features": 16}),
]


def _qkv(b=2, h=2, n=70, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def _causal(kernel):
    return lambda q, k, v: kernel(q, k, v, causal=True)


def _masked(kernel):
    return lambda q, k, v, m: kernel(q, k, v, attention_mask=m, causal=True)


# --- the checker itself -----------------------------------------------------------


def test_checker_passes_a_prefix_consistent_function_with_padding():
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    report = assert_prefix_consistent(
        lambda t: t.cumsum(1), [x], seq_dim=1, padded=lambda t, m: (t * m[..., None]).cumsum(1)
    )
    assert report.lengths == list(range(1, 9)) and report.max_error < 1e-12


def test_checker_pads_with_a_mask_of_exactly_n_real_tokens():
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    seen = []

    def padded(t, m):
        seen.append(m.sum(1).tolist())
        return t.cumsum(1)

    assert_prefix_consistent(lambda t: t.cumsum(1), [x], seq_dim=1, padded=padded)
    assert seen == [[n, n] for n in range(1, 6)]


def test_checker_catches_a_length_dependent_function():
    # causal (no future value enters the past) but scaled by N: passes a leak test at fixed N
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="differs from out"):
        assert_prefix_consistent(lambda t: t.cumsum(1) / t.shape[1], [x], seq_dim=1)


def test_checker_catches_a_small_length_dependence_at_the_default_tolerance():
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="atol=1e-08"):
        assert_prefix_consistent(lambda t: t.cumsum(1) * (1 + 1e-6 * t.shape[1]), [x])


def test_checker_catches_padding_that_is_not_masked():
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="right padding"):
        assert_prefix_consistent(
            lambda t: t.cumsum(1), [x], seq_dim=1, padded=lambda t, m: t.cumsum(1) + t.sum(1, True)
        )


def test_checker_catches_a_segment_size_derived_from_n():
    # the old default s = ⌈√N⌉ changes the segmentation with the length
    def sqrt_segments(q, k, v):
        return causal_nystrom_attention(q, k, v, math.ceil(math.sqrt(q.shape[2])))[0]

    report = check_prefix_consistency(sqrt_segments, _qkv(n=40), seq_dim=2, lengths=[20])
    assert report.prefix_error[20] > 1e-2
    with pytest.raises(AssertionError, match="n=20"):
        assert_prefix_consistent(sqrt_segments, _qkv(n=40), seq_dim=2, lengths=[20])


def test_checker_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        check_prefix_consistency(lambda t: t, [torch.randn(2, 5, 3)], lengths=[0])
    with pytest.raises(ValueError, match="lengths"):
        check_prefix_consistency(lambda t: t, [torch.randn(2, 5, 3)], lengths=[6])


# --- every causal kernel ----------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_kernel_is_prefix_consistent_float64(name):
    kernel = attention.build(name).eval()
    # N = 70 spans several default causal_nystrom segments (s = 32) and linear chunks
    assert_prefix_consistent(
        _causal(kernel), _qkv(), seq_dim=2, padded=_masked(kernel), atol=1e-8
    )


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_kernel_is_prefix_consistent_float32(name):
    kernel = attention.build(name).eval()
    q, k, v = _qkv(n=40, seed=1, dtype=torch.float32)
    assert_prefix_consistent(
        _causal(kernel), [q, k, v], seq_dim=2, padded=_masked(kernel), atol=1e-5,
        lengths=[1, 2, 31, 32, 33, 39],
    )  # fmt: skip


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=lambda p: str(p))
def test_kernel_variants_are_prefix_consistent(name, options):
    kernel = attention.build(name, **options).eval()
    assert_prefix_consistent(
        _causal(kernel), _qkv(n=13, seed=2), seq_dim=2, padded=_masked(kernel)
    )
