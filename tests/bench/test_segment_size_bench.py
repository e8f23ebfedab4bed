"""The segment-size measurement: its extremes are exact, so its errors mean something."""

import pytest
import torch

from formerlab.attention.softmax import softmax_attention
from formerlab.bench.segment_size import family_inputs, local_only, measure


def test_rows_and_exact_extremes():
    rows = measure(sizes=[24], segments=[1, 24], head_dim=4)
    assert [r["data"] for r in rows] == ["gaussian", "sharp", "walk"]
    for row in rows:
        # s = 1 (every token a landmark) and s = N (one exact segment) are exact
        assert float(row["s = 1"]) < 1e-10 and float(row["s = 24"]) < 1e-10
        err, used = row["s = ⌈√N⌉"].split(" (")
        assert used == "s = 5)" and float(err) > 1e-3  # in between, it approximates


def test_local_only_is_block_diagonal_causal_softmax():
    q, k, v = family_inputs("gaussian", 12, 4)
    out = local_only(q, k, v, 32)  # one segment covers all: exact
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=True)[0])
    part = local_only(q, k, v, 4)
    torch.testing.assert_close(part[:, :, 4:8], softmax_attention(*(t[:, :, 4:8] for t in (q, k, v)), causal=True)[0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        family_inputs("uniform", 4, 2)
    with pytest.raises(ValueError, match="segments"):
        measure(sizes=[8], segments=[0])
