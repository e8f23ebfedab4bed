"""The attention mixer's short convolution over q, k, v (``conv=c``): what it sees and
what it refuses. Streaming, masked streaming and packing with it are covered by the
registry-driven mixer tests (their ``-conv`` cases)."""

import pytest
import torch

from formerlab import mixers

F64 = torch.float64


def build(**options):
    torch.manual_seed(0)
    return mixers.build("attention", dim=8, heads=2, **options).to(F64).eval()


def test_q_k_v_are_the_convolution_of_the_projected_window():
    # ground truth from the formula: qkv_t = silu(sum_j w[:, j] * (P x)_{t - c + 1 + j}),
    # inputs before the first token counted as 0; padded tokens enter as zeros
    m = build(conv=3)
    x = torch.randn(2, 6, 8, dtype=F64)
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    projected = (x @ m.qkv.weight.T) * mask[..., None]
    w = m.conv.weight  # (channels, taps)
    want = torch.zeros_like(projected)
    for t in range(6):
        for j in range(3):
            s = t - 2 + j
            if s >= 0:
                want[:, t] += w[:, j] * projected[:, s]
    want = torch.nn.functional.silu(want)
    q, k, v = m.qkv_heads(x, mask)
    got = torch.cat([h.transpose(1, 2).reshape(2, 6, 8) for h in (q, k, v)], dim=-1)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("conv", [1, -2, 2.0, True, "4"])
def test_bad_conv_sizes_are_refused(conv):
    with pytest.raises(ValueError, match=r"conv=.*integer >= 2"):
        build(conv=conv)


def test_a_state_built_without_the_convolution_is_refused():
    plain, conv = build(), build(conv=4)
    x = torch.randn(1, 2, 8, dtype=F64)
    with pytest.raises(ValueError, match="window holds None inputs, expected 3"):
        conv.step(x, plain.init_state(1, dtype=F64))
    with pytest.raises(ValueError, match="window holds 3 inputs, expected None"):
        plain.step(x, conv.init_state(1, dtype=F64))


def test_the_convolution_disables_the_fused_projection_path():
    # the bidirectional call may fuse the projection into the kernel (Nyström); with a
    # convolution between them it must not, or the convolution would be skipped
    torch.manual_seed(0)
    m = mixers.build("attention", dim=8, heads=2, kernel="nystrom", num_landmarks=4, conv=3)
    x = torch.randn(1, 8, 8)
    assert not m._projection_fusable(x)
    reference = m.kernel(*m.qkv_heads(x), causal=False)
    expected = m.out(reference.transpose(1, 2).reshape(1, 8, 8))
    assert torch.allclose(m(x), expected, atol=1e-6)
