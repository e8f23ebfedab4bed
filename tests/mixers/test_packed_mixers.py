"""Packed sequences (``cu_seqlens``, B = 1) in every token mixer, registry-driven.

Every causal mixer (with every causal kernel, with and without rotary positions) takes
``cu_seqlens`` with ``causal=True``; with ``causal=False`` pooling and the kernel mixers
with a bidirectional packed kernel do. For each: the packed call equals each sequence run
alone, values and gradients (inputs and parameters, float64, <= 1e-9), for random
boundaries including length-1 sequences and S = 1 (rotary positions restart at each
boundary, or the rope cases would differ); nothing crosses a boundary; ``prefill`` of the
packed prompts, then steps of all S sequences together, equals each sequence alone. Every
call that cannot take ``cu_seqlens`` is refused naming those that can.
"""

from itertools import accumulate

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from formerlab import attention, mixers
from formerlab.mixers.params import takes_kernel
from formerlab.mixers.self_attention import merge_heads
from formerlab.mixers.streaming import rotate

F64 = torch.float64
DIM, HEADS = 16, 2
SMALL = {
    "performer": {"num_features": 16},
    "causal_nystrom": {"segment_size": 3},
    "nystrom": {"num_landmarks": 4},
    "landmark": {"num_landmarks": 4},
}


def cases():
    """(id, mixer, options, causal): every causal mixer x causal kernel x rope with
    causal=True, and every mixer x bidirectional packed kernel with causal=False."""
    out = []
    for name in mixers.available(causal=True):
        if not takes_kernel(name):
            out.append((f"{name}-causal", name, {}, True))
            if name in ("retention", "gla"):  # their optional short convolution resets too
                out.append((f"{name}-conv-causal", name, {"conv": 3}, True))
            continue
        for kernel in attention.available(causal=True):
            for rope in (False, True):
                options = {"kernel": kernel, "rope": rope, **SMALL.get(kernel, {})}
                out.append((f"{name}-{kernel}{'-rope' if rope else ''}", name, options, True))
        if name in ("attention", "metric", "quadratic"):  # the short convolution resets
            out.append((f"{name}-softmax-conv", name, {"rope": True, "conv": 3}, True))
    for name in mixers.available():
        if not takes_kernel(name):
            if build(name, {}).packs(False):
                out.append((f"{name}-bidirectional", name, {}, False))
            continue
        for kernel in attention.available(causal=False, packed=True):
            rope = kernel == "softmax"  # rotary positions restart in a bidirectional call too
            options = {"kernel": kernel, "rope": rope, **SMALL.get(kernel, {})}
            out.append((f"{name}-{kernel}-bidirectional", name, options, False))
    return out


def build(name, options, seed=0):
    torch.manual_seed(seed)
    return mixers.build(name, dim=DIM, heads=HEADS, **options).to(F64).eval()


CASES = cases()
IDS = [c[0] for c in CASES]
CASES = [c[1:] for c in CASES]
STREAM_CASES = [c for c in CASES if c[2] and build(c[0], c[1]).supports_streaming]
STREAM_IDS = [i for i, c in zip(IDS, CASES) if c in STREAM_CASES]
LENGTHS = st.lists(st.integers(1, 8), min_size=1, max_size=4)


def offsets(lengths, dtype=torch.int64):
    return torch.tensor([0, *accumulate(lengths)], dtype=dtype)


def spans(lengths):
    ends = list(accumulate(lengths))
    return list(zip([0, *ends[:-1]], ends))


def tokens(n, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, DIM, generator=g, dtype=F64)


def test_the_cases_cover_every_mixer():
    names = {c[0] for c in CASES}
    assert names == set(mixers.available(causal=True)) | {"pooling"}
    assert {"retention", "gla", "deltanet", "gated_deltanet", "mamba2"} <= names
    assert any(not c[2] for c in CASES if c[0] == "attention")


@pytest.mark.parametrize(("name", "options", "causal"), CASES, ids=IDS)
@settings(max_examples=2, deadline=None)
@given(lengths=LENGTHS, seed=st.integers(0, 2**16))
@example(lengths=[1], seed=0)
@example(lengths=[6, 1, 8], seed=1)
def test_packed_mixer_equals_each_sequence_alone(name, options, causal, lengths, seed):
    mixer = build(name, options)
    x = tokens(sum(lengths), seed).requires_grad_()
    out = mixer(x, causal=causal, cu_seqlens=offsets(lengths, torch.int32))
    assert out.shape == x.shape and out.dtype == F64
    alone = torch.cat([mixer(x[:, a:b], causal=causal) for a, b in spans(lengths)], dim=1)
    assert (out - alone).abs().max() <= 1e-9
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    wrt = [x, *mixer.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), wrt, allow_unused=True)
    ref = torch.autograd.grad((alone * weight).sum(), wrt, allow_unused=True)
    for g, r in zip(grads, ref):
        assert (g is None) == (r is None)
        if g is not None:
            assert (g - r).abs().max() <= 1e-9


@pytest.mark.parametrize(("name", "options", "causal"), CASES, ids=IDS)
def test_nothing_crosses_a_boundary(name, options, causal):
    mixer = build(name, options)
    lengths = [4, 1, 7, 3]
    cu = offsets(lengths)
    x = tokens(sum(lengths), seed=2).requires_grad_()
    out = mixer(x, causal=causal, cu_seqlens=cu)
    for j, (a, b) in enumerate(spans(lengths)):
        bumped = x.detach().clone()
        bumped[:, a:b] += 3 * torch.randn_like(bumped[:, a:b])
        other = mixer(bumped, causal=causal, cu_seqlens=cu)
        keep = torch.ones(sum(lengths), dtype=torch.bool)
        keep[a:b] = False
        assert (other - out)[:, keep].abs().max() <= 1e-12, j
        if b - a > 1:  # (pooling maps a lone token to 0 whatever it is)
            assert (other - out)[:, ~keep].abs().max() > 1e-4, j  # the bump is seen
        (grad,) = torch.autograd.grad(out[:, a:b].sum(), x, retain_graph=True)
        assert not grad[:, keep].any(), j


@pytest.mark.parametrize(("name", "options", "causal"), STREAM_CASES, ids=STREAM_IDS)
@settings(max_examples=2, deadline=None)
@given(lengths=LENGTHS, seed=st.integers(0, 2**16))
@example(lengths=[1], seed=0)
@example(lengths=[5, 1, 8], seed=1)
def test_streaming_from_a_packed_prefill_equals_each_sequence_alone(
    name, options, causal, lengths, seed
):
    mixer = build(name, options)
    x = tokens(sum(lengths), seed)
    cu = offsets(lengths)
    out, state = mixer.prefill(x, cu)
    assert (out - mixer(x, causal=True, cu_seqlens=cu)).abs().max() <= 1e-10
    more = tokens(4, seed + 1, batch=len(lengths))
    steps = []
    for a, b in ((0, 1), (1, 3), (3, 4)):  # one token, two tokens, one token: B = S
        piece, state = mixer.step(more[:, a:b], state)
        steps.append(piece)
    steps = torch.cat(steps, dim=1)
    for i, (a, b) in enumerate(spans(lengths)):
        ref = mixer(torch.cat([x[:, a:b], more[i : i + 1]], dim=1), causal=True)
        assert (out[:, a:b] - ref[:, : b - a]).abs().max() <= 1e-10, i
        assert (steps[i : i + 1] - ref[:, b - a :]).abs().max() <= 1e-10, i


def test_rope_positions_restart_at_each_boundary():
    """Not only relative: with ``linear`` the rotary score depends on absolute positions,
    so the second sequence equals itself alone only if its positions restart at 0."""
    mixer = build("attention", {"kernel": "linear", "rope": True})
    x = tokens(9, seed=3)
    out = mixer(x, causal=True, cu_seqlens=offsets([4, 5]))
    q, k, v = mixer.qkv_heads(x[:, 4:])
    restarted = mixer.kernel(*rotate(q, k, 0), v, causal=True)
    assert (mixer.out(merge_heads(restarted)) - out[:, 4:]).abs().max() <= 1e-12
    # positions continuing from the first sequence (4 … 8) would give something else
    continued = mixer.kernel(*rotate(q, k, 4), v, causal=True)
    assert (continued - restarted).abs().max() > 1e-3


# --- refusals ---------------------------------------------------------------------


def refused():
    """(id, mixer, options, causal) calls that cannot take cu_seqlens."""
    out = [
        ("attention-double_softmax", "attention", {"kernel": "double_softmax"}, False),
        ("metric-causal_nystrom", "metric", {"kernel": "causal_nystrom"}, False),
        ("quadratic-double_softmax", "quadratic", {"kernel": "double_softmax"}, False),
    ]
    for name in mixers.available(causal=True):
        if not takes_kernel(name) and not build(name, {}).packs(False):
            out.append((f"{name}-bidirectional", name, {}, False))
    return out


REFUSED = refused()


@pytest.mark.parametrize(
    ("name", "options", "causal"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_a_mixer_that_cannot_pack_names_those_that_can(name, options, causal):
    mixer = build(name, options)
    with pytest.raises(ValueError, match=rf"{name!r} .* cannot take cu_seqlens") as err:
        mixer(tokens(5, 0), causal=causal, cu_seqlens=offsets([2, 3]))
    message = str(err.value)
    assert str(mixers.available(causal=True)) in message
    assert str(attention.available(causal=False, packed=True)) in message
    assert "'pooling'" in message


def test_the_recurrent_mixers_are_refused_bidirectionally():
    ids = {c[1] for c in REFUSED}
    assert {"retention", "gla", "deltanet", "gated_deltanet", "mamba2"} <= ids


def test_a_non_causal_kernel_is_refused_for_causal_first():
    mixer = build("attention", {"kernel": "nystrom", "num_landmarks": 2})
    with pytest.raises(ValueError, match="does not support causal=True"):
        mixer(tokens(5, 0), causal=True, cu_seqlens=offsets([2, 3]))


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        (torch.tensor([0.0, 5.0]), "cu_seqlens has dtype torch.float32, expected torch.int32"),
        (torch.tensor([[0, 5]]), r"cu_seqlens has shape \(1, 2\), expected \[S \+ 1\]"),
        (torch.tensor([0, 3, 3, 5]), r"cu_seqlens=\[0, 3, 3, 5\] .* strictly increasing"),
        (torch.tensor([0, 4]), r"cu_seqlens=\[0, 4\] .* from 0 to T=5"),
        (torch.tensor([2, 5]), r"cu_seqlens=\[2, 5\] .* from 0"),
    ],
)
@pytest.mark.parametrize("name", ["attention", "pooling", "retention"])
def test_bad_cu_seqlens_are_refused(name, cu, message):
    mixer = build(name, {})
    with pytest.raises(ValueError, match=message):
        mixer(tokens(5, 0), causal=True, cu_seqlens=cu)
    with pytest.raises(ValueError, match=message):
        mixer.prefill(tokens(5, 0), cu)


def test_packed_input_needs_one_row_and_no_mask():
    mixer = build("attention", {})
    with pytest.raises(ValueError, match="cu_seqlens needs a batch size of 1.*got B=2"):
        mixer(tokens(5, 0, batch=2), causal=True, cu_seqlens=offsets([2, 3]))
    with pytest.raises(ValueError, match="cu_seqlens needs a batch size of 1.*got B=2"):
        mixer.prefill(tokens(5, 0, batch=2), offsets([2, 3]))
    mask = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask cannot be combined with cu_seqlens"):
        mixer(tokens(5, 0), mask, causal=True, cu_seqlens=offsets([2, 3]))


def test_prefill_needs_a_streaming_mixer():
    mixer = build("attention", {"kernel": "nystrom", "num_landmarks": 2})
    with pytest.raises(ValueError, match="does not support streaming"):
        mixer.prefill(tokens(5, 0), offsets([2, 3]))
