"""Every causal token mixer, with every causal kernel, streams: ``init_state`` / ``step``
one token at a time and in uneven chunks equals the parallel causal call, and the
parallel call is causal and prefix-consistent. Registry-driven: a new causal mixer or
kernel is checked with no new test written."""

import pytest
import torch

from formerlab import attention, mixers
from formerlab.mixers.params import takes_kernel
from formerlab.testing import assert_no_future_leak, assert_prefix_consistent

DIM, HEADS = 16, 2


def cases(rope=False):
    """(id, builder) for every causal mixer x causal kernel (mixers without a kernel once)."""
    out = []
    for name in mixers.available(causal=True):
        if takes_kernel(name):
            for kernel in attention.available(causal=True):
                extra = {"rope": True} if rope else {}
                out.append((f"{name}-{kernel}", name, {"kernel": kernel, **extra}))
                if name in ("attention", "metric", "quadratic"):  # with the short convolution
                    options = {"kernel": kernel, "conv": 3, **extra}
                    out.append((f"{name}-{kernel}-conv", name, options))
        elif not rope:
            out.append((name, name, {}))
            if name in ("retention", "gla"):  # with their optional short convolution
                out.append((f"{name}-conv", name, {"conv": 3}))
    return out


CASES = cases()
ROPE_CASES = cases(rope=True)


def build(name, options, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return mixers.build(name, dim=DIM, heads=HEADS, **options).to(dtype).eval()


def stepped(mixer, x, chunks):
    """Feed x (B, N, C) to ``mixer.step`` in chunks of the given sizes; concatenate."""
    state = mixer.init_state(x.shape[0], dtype=x.dtype)
    outs, start = [], 0
    for size in chunks:
        out, state = mixer.step(x[:, start : start + size], state)
        outs.append(out)
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1)


def uneven(n):
    sizes, k = [], 0
    pattern = [1, 3, 2, 7, 1, 5]
    while sum(sizes) < n:
        sizes.append(min(pattern[k % len(pattern)], n - sum(sizes)))
        k += 1
    return sizes


@pytest.mark.parametrize("case", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_causal_mixer_streams(case):
    name, options = case
    mixer = build(name, options)
    assert mixer.supports_streaming, f"{name} {options} does not stream"
    n = 70  # past causal_nystrom's default segment (32): finished segments are streamed
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x, causal=True)
        for chunks in ([1] * n, uneven(n), [n]):
            got = stepped(mixer, x, chunks)
            assert got.dtype == x.dtype
            torch.testing.assert_close(got, full, atol=1e-8, rtol=0)


@pytest.mark.parametrize("case", [c[1:] for c in ROPE_CASES], ids=[c[0] for c in ROPE_CASES])
def test_rotary_mixers_stream_with_the_position_offset(case):
    name, options = case
    mixer = build(name, options)
    x = torch.randn(1, 17, DIM, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x, causal=True)
        torch.testing.assert_close(stepped(mixer, x, uneven(17)), full, atol=1e-8, rtol=0)
        # the rotation is really applied: without it the outputs differ
        plain = build(name, {**options, "rope": False})
        assert (plain(x, causal=True) - full).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", attention.available(causal=True))
def test_float32_streaming_over_500_tokens(kernel):
    mixer = build("attention", {"kernel": kernel}, dtype=torch.float32, seed=1)
    x = torch.randn(1, 500, DIM)
    with torch.no_grad():
        full = mixer(x, causal=True)
        got = stepped(mixer, x, [1] * 40 + uneven(460))
    torch.testing.assert_close(got, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_causal_mixer_is_causal_with_gradients(case):
    name, options = case
    mixer = build(name, options, seed=2)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    assert_no_future_leak(lambda t: mixer(t, causal=True), [x], seq_dim=1)


@pytest.mark.parametrize("case", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_causal_mixer_is_prefix_consistent(case):
    name, options = case
    mixer = build(name, options, seed=3)
    x = torch.randn(2, 70, DIM, dtype=torch.float64)
    assert_prefix_consistent(
        lambda t: mixer(t, causal=True), [x], seq_dim=1, lengths=[1, 7, 20, 33, 40, 65],
        padded=lambda t, mask: mixer(t, attention_mask=mask, causal=True),
    )


@pytest.mark.parametrize("size", [1, 2, 5])
def test_pooling_stream_keeps_a_window_of_pool_size_minus_one(size):
    mixer = build("pooling", {"pool_size": size})
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    state = mixer.init_state(2, dtype=torch.float64)
    outs = []
    for i in range(13):
        out, state = mixer.step(x[:, i : i + 1], state)
        outs.append(out)
        assert state.window.shape[1] == min(i + 1, size - 1)
    # ground truth: mean of the last `size` inputs minus the current one
    want = torch.stack(
        [x[:, max(0, i - size + 1) : i + 1].mean(1) - x[:, i] for i in range(13)], dim=1
    )
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-12, rtol=0)


def test_bad_stream_use_is_refused():
    mixer = build("attention", {"kernel": "softmax"})
    state = mixer.init_state(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one new token"):
        mixer.step(torch.zeros(1, 0, DIM, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="batch"):
        mixer.init_state(0)
    with pytest.raises(ValueError, match="rope"):
        mixers.build("attention", dim=DIM, heads=HEADS, rope="yes")
    noncausal = mixers.build("attention", dim=DIM, heads=HEADS, kernel="nystrom")
    assert not noncausal.supports_streaming
    with pytest.raises(ValueError, match="does not support streaming"):
        noncausal.init_state(1)
