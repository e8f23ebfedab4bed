"""Segment means over real tokens: layout rules, padding invariance, any N."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab.linalg.segments import segment_layout, segment_means, segment_sums


def reference_means(x_seq: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of an unpadded (H, L, D) sequence by the documented rule, with Python loops."""
    h, length, d = x_seq.shape
    sums = torch.zeros(h, m, d, dtype=torch.float64)
    counts = torch.zeros(m, dtype=torch.float64)
    for r in range(length):
        s = r * m // length
        sums[:, s] += x_seq[:, r].double()
        counts[s] += 1
    return sums / counts.clamp(min=1)[None, :, None], counts > 0


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 12),
    data=st.data(),
)
def test_layout_segments_are_contiguous_balanced_and_skip_padding(n, m, data):
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))[None]
    lay = segment_layout(n, m, mask)
    length = int(mask.sum())
    assert int(lay.lengths) == length
    assert int(lay.counts.sum()) == length
    ids = lay.ids[0][mask[0]]
    assert torch.all(ids[1:] >= ids[:-1])  # contiguous in order of the real tokens
    assert torch.all(lay.ids[0][~mask[0]] == m)  # padded tokens belong to no segment
    if length >= m:
        assert bool(lay.nonempty.all())
        assert int(lay.counts.max() - lay.counts.min()) <= 1
    else:  # every real token is its own segment
        assert int(lay.counts.max()) <= 1
        assert int(lay.nonempty.sum()) == length
    assert bool(lay.exact[0]) == (length <= m)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    m=st.integers(1, 10),
    left=st.booleans(),
)
def test_means_of_padded_batch_equal_means_of_each_sequence_alone(lengths, m, left):
    n = max(lengths) + 3
    x = torch.randn(len(lengths), 2, n, 5)
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        if left:
            mask[b, n - length:] = True
        else:
            mask[b, :length] = True
    means, nonempty = segment_means(x, m, mask)
    assert means.shape == (len(lengths), 2, m, 5)
    for b in range(len(lengths)):
        seq = x[b][:, mask[b]]
        ref, ref_nonempty = reference_means(seq, m)
        torch.testing.assert_close(means[b].double(), ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(nonempty[b], ref_nonempty)
        alone, _ = segment_means(seq[None], m)  # same sequence without padding
        torch.testing.assert_close(means[b], alone[0], atol=1e-6, rtol=1e-6)


def test_reshape_fast_path_matches_general_path_and_keeps_dtype():
    x = torch.randn(2, 3, 24, 4, dtype=torch.float64)
    fast, _ = segment_means(x, 6)
    general = segment_sums(x, segment_layout(24, 6, batch=2)) / 4
    torch.testing.assert_close(fast, general)
    half, _ = segment_means(x.to(torch.bfloat16), 6)
    assert half.dtype == torch.bfloat16


def test_n_not_multiple_of_m_has_no_zero_padding_bias():
    # constant sequence: every landmark must equal the constant (zero padding would not)
    x = torch.full((1, 1, 10, 3), 2.5)
    means, _ = segment_means(x, 4)
    assert torch.all(means == 2.5)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="num_segments"):
        segment_layout(5, 0)
    with pytest.raises(ValueError, match="attention_mask"):
        segment_layout(5, 2, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x"):
        segment_means(torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="num_segments or a layout"):
        segment_means(torch.randn(1, 5, 3))
