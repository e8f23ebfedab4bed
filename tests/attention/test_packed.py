"""Packed sequences (``cu_seqlens``, B = 1) in every attention kernel, registry-driven.

For every kernel and every call it declares in ``packed_modes`` (``causal=True`` for the
causal kernels, ``causal=False`` for the bidirectional ones, the Nyström kernels with
landmarks per sequence): the packed call equals each sequence run alone, values and
gradients (float64, <= 1e-9), for random boundaries including length-1 sequences and
S = 1; nothing crosses a boundary (perturbing one sequence changes no other, and no
gradient flows between sequences); a streaming prefill of the packed prompts, then steps
of all S sequences together, equals each sequence alone. Every kernel or call that cannot
take ``cu_seqlens`` and every malformed ``cu_seqlens`` is refused with a ``ValueError``.
"""

from itertools import accumulate

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from formerlab import attention
from formerlab.attention.packed import Packing, as_packing

F64 = torch.float64
H, D, E = 2, 4, 3
# small options: the approximations are active at these lengths (sequences longer than
# the 4 landmarks, several segments of 3), and performer is quick with 16 features
OPTIONS = {
    "performer": {"num_features": 16},
    "nystrom": {"num_landmarks": 4},
    "landmark": {"num_landmarks": 4},
    "causal_nystrom": {"segment_size": 3},
}


def cases():
    """(id, name, options, causal) for every kernel and every call it packs."""
    out = []
    for name in attention.available(packed=True):
        kernel = attention.build(name, **OPTIONS.get(name, {}))
        for causal in (True, False):
            if kernel.packs(causal):
                out.append((f"{name}-{'causal' if causal else 'bidirectional'}", name, causal))
    out.append(("causal_nystrom-default-causal", "causal_nystrom-default", True))
    return out


CASES = cases()
IDS = [c[0] for c in CASES]
CASES = [c[1:] for c in CASES]


def build(name):
    if name == "causal_nystrom-default":
        return attention.build("causal_nystrom").eval()
    return attention.build(name, **OPTIONS.get(name, {})).eval()


def offsets(lengths, dtype=torch.int64):
    return torch.tensor([0, *accumulate(lengths)], dtype=dtype)


def value_dim(name):
    """E != D catches a mix-up of the two, except for nystrom: its fused unmasked backward
    (the reference run alone) needs E = D."""
    return D if name == "nystrom" else E


def packed_qkv(n, seed, grad=False, e=E):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, H, n, D, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(1, H, n, e, generator=g, dtype=F64)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def spans(lengths):
    ends = list(accumulate(lengths))
    return list(zip([0, *ends[:-1]], ends))


LENGTHS = st.lists(st.integers(1, 9), min_size=1, max_size=4)


# --- the layout ------------------------------------------------------------------


def test_packing_layout_right_and_left():
    p = as_packing(offsets([2, 1, 3]), 1, 6)
    assert (p.count, p.total, p.max_len, p.lengths) == (3, 6, 3, (2, 1, 3))
    assert p.positions.tolist() == [[0, 1, 0, 0, 1, 2]]
    assert p.sequence_ids.tolist() == [0, 0, 1, 2, 2, 2]
    assert p.mask().tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert p.mask(left=True).tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    x = torch.arange(1.0, 7.0).view(1, 6, 1)
    assert p.pad(x, 1)[..., 0].tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6]]
    assert p.pad(x, 1, left=True)[..., 0].tolist() == [[0, 1, 2], [0, 0, 3], [4, 5, 6]]
    for left in (False, True):
        assert torch.equal(p.unpad(p.pad(x, 1, left), 1, left), x)
    qkv = torch.randn(1, H, 6, D)
    assert torch.equal(p.unpad(p.pad(qkv, 2), 2), qkv) and p.pad(qkv, 2).shape == (3, H, 3, D)
    assert torch.allclose(p.segment_mean(x)[:, 0], torch.tensor([1.5, 3.0, 5.0]))


def test_pad_and_unpad_are_differentiable():
    p = as_packing(offsets([3, 1, 2]), 1, 6)
    x = torch.randn(1, 2, 6, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: p.pad(t, 2, left=True), (x,))
    y = torch.randn(3, 2, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: p.unpad(t, 2), (y,))
    z = torch.randn(1, 6, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(p.segment_mean, (z,))


def test_a_packing_is_reused_and_checked():
    p = as_packing(offsets([2, 3], torch.int32), 1, 5)
    assert as_packing(p, 1, 5) is p
    with pytest.raises(ValueError, match="N=5"):
        as_packing(p, 1, 6)
    with pytest.raises(ValueError, match="B=2"):
        as_packing(p, 2, 5)
    with pytest.raises(ValueError, match="N=5 tokens"):
        p.pad(torch.zeros(1, 4, 2), 1)


def test_the_registry_lists_the_packed_kernels():
    assert attention.available(causal=True, packed=True) == attention.available(causal=True)
    assert attention.available(causal=False, packed=True) == [
        "landmark", "linear", "nystrom", "performer", "softmax",
    ]  # fmt: skip
    assert "double_softmax" not in attention.available(packed=True)


# --- packed = each sequence alone ------------------------------------------------


@pytest.mark.parametrize(("name", "causal"), CASES, ids=IDS)
@settings(max_examples=4, deadline=None)
@given(lengths=LENGTHS, seed=st.integers(0, 2**16))
@example(lengths=[1], seed=0)
@example(lengths=[7, 1, 9, 1], seed=1)
def test_packed_call_equals_each_sequence_alone(name, causal, lengths, seed):
    kernel = build(name)
    q, k, v = packed_qkv(sum(lengths), seed, grad=True, e=value_dim(name))
    cu = offsets(lengths, torch.int32 if seed % 2 else torch.int64)
    out = kernel(q, k, v, causal=causal, cu_seqlens=cu)
    assert out.shape == (1, H, sum(lengths), value_dim(name)) and out.dtype == F64
    alone = torch.cat(
        [
            kernel(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal)
            for a, b in spans(lengths)
        ],
        dim=2,
    )
    assert (out - alone).abs().max() <= 1e-9
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref = torch.autograd.grad((alone * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        assert (g - r).abs().max() <= 1e-9


@pytest.mark.parametrize(("name", "causal"), CASES, ids=IDS)
def test_nothing_crosses_a_boundary(name, causal):
    kernel = build(name)
    lengths = [4, 1, 7, 3]
    q, k, v = packed_qkv(sum(lengths), seed=3, grad=True, e=value_dim(name))
    cu = offsets(lengths)
    out = kernel(q, k, v, causal=causal, cu_seqlens=cu)
    for j, (a, b) in enumerate(spans(lengths)):
        bumped = [t.detach().clone() for t in (q, k, v)]
        for t in bumped:
            t[:, :, a:b] += 3 * torch.randn_like(t[:, :, a:b])
        other = kernel(*bumped, causal=causal, cu_seqlens=cu)
        keep = torch.ones(sum(lengths), dtype=torch.bool)
        keep[a:b] = False
        assert (other - out)[:, :, keep].abs().max() <= 1e-12, j
        assert (other - out)[:, :, ~keep].abs().max() > 1e-3, j  # the bump is seen
        # no gradient from sequence j's outputs reaches any other sequence's inputs
        grads = torch.autograd.grad(out[:, :, a:b].sum(), (q, k, v), retain_graph=True)
        for g in grads:
            assert not g[:, :, keep].any(), j


@pytest.mark.parametrize(("name", "causal"), CASES, ids=IDS)
def test_packed_weights_are_block_diagonal(name, causal):
    kernel = build(name)
    lengths = [3, 1, 5]
    q, k, v = packed_qkv(9, seed=4, e=value_dim(name))
    out, weights = kernel(q, k, v, causal=causal, need_weights=True, cu_seqlens=offsets(lengths))
    assert weights.shape == (1, H, 9, 9)
    plain = kernel(q, k, v, causal=causal, cu_seqlens=offsets(lengths))
    assert (out - plain).abs().max() <= 1e-12
    block = torch.zeros(9, 9, dtype=torch.bool)
    for a, b in spans(lengths):
        block[a:b, a:b] = True
        piece = (t[:, :, a:b] for t in (q, k, v))
        _, alone = kernel(*piece, causal=causal, need_weights=True)
        assert (weights[:, :, a:b, a:b] - alone).abs().max() <= 1e-12
    assert not weights[:, :, ~block].any()


# --- streaming from a packed prefill ------------------------------------------------

STREAM_CASES = [(n, c) for n, c in CASES if c and build(n).supports_streaming]
STREAM_IDS = [n for n, c in STREAM_CASES]


@pytest.mark.parametrize(("name", "causal"), STREAM_CASES, ids=STREAM_IDS)
@settings(max_examples=3, deadline=None)
@given(lengths=LENGTHS, seed=st.integers(0, 2**16))
@example(lengths=[1], seed=0)
@example(lengths=[5, 1, 8], seed=1)
def test_streaming_from_a_packed_prefill_equals_each_sequence_alone(name, causal, lengths, seed):
    kernel = build(name)
    s, extra = len(lengths), 4
    q, k, v = packed_qkv(sum(lengths), seed)
    cu = offsets(lengths)
    out, state = kernel.prefill(q, k, v, cu)
    assert (out - kernel(q, k, v, causal=True, cu_seqlens=cu)).abs().max() <= 1e-10
    g = torch.Generator().manual_seed(seed + 1)
    more = [torch.randn(s, H, extra, d, generator=g, dtype=F64) for d in (D, D, E)]
    steps = []
    for cut in ((0, 1), (1, 3), (3, 4)):  # one token, two tokens, one token: B = S
        piece, state = kernel.step(*(t[:, :, cut[0] : cut[1]] for t in more), state)
        steps.append(piece)
    steps = torch.cat(steps, dim=2)
    for i, (a, b) in enumerate(spans(lengths)):
        whole = [torch.cat([t[:, :, a:b], m[i : i + 1]], dim=2) for t, m in zip((q, k, v), more)]
        ref = kernel(*whole, causal=True)
        assert (out[:, :, a:b] - ref[:, :, : b - a]).abs().max() <= 1e-10, i
        assert (steps[i : i + 1] - ref[:, :, b - a :]).abs().max() <= 1e-10, i


def test_prefill_needs_a_streaming_kernel():
    q, k, v = packed_qkv(5, seed=0)
    with pytest.raises(ValueError, match=r"'nystrom' cannot prefill.*streaming kernels: \["):
        attention.build("nystrom", num_landmarks=2).prefill(q, k, v, offsets([2, 3]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention.build("softmax").prefill(q, k, v, offsets([2, 2]))


# --- refusals ---------------------------------------------------------------------


def refused_calls():
    """(kernel, causal) for every registered kernel and call that does not pack (a
    non-causal kernel asked for causal=True is refused for that reason first)."""
    out = []
    for name in attention.available():
        kernel = attention.build(name)
        for causal in (True, False):
            if not kernel.packs(causal) and (kernel.supports_causal or not causal):
                out.append((name, causal))
    return out


REFUSED = refused_calls()


def test_the_refused_calls_include_the_known_ones():
    assert ("double_softmax", False) in REFUSED and ("causal_nystrom", False) in REFUSED


@pytest.mark.parametrize(("name", "causal"), REFUSED, ids=[f"{n}-{c}" for n, c in REFUSED])
def test_a_kernel_that_cannot_pack_names_those_that_can(name, causal):
    q, k, v = packed_qkv(5, seed=0)
    can = attention.available(causal=causal, packed=True)
    with pytest.raises(ValueError, match=rf"{name!r} cannot take cu_seqlens") as err:
        attention.build(name)(q, k, v, causal=causal, cu_seqlens=offsets([2, 3]))
    assert str(can) in str(err.value)


BAD = [
    (torch.tensor([0.0, 2.0, 5.0]), r"cu_seqlens has dtype torch.float32, expected torch.int32"),
    (torch.tensor([[0, 2, 5]]), r"cu_seqlens has shape \(1, 3\), expected \[S \+ 1\]"),
    (torch.tensor([0]), r"cu_seqlens has shape \(1,\), expected \[S \+ 1\] with S >= 1"),
    (torch.tensor([1, 2, 5]), r"cu_seqlens=\[1, 2, 5\] is not allowed; expected strictly"),
    (torch.tensor([0, 2, 4]), r"cu_seqlens=\[0, 2, 4\] .* from 0 to T=5"),
    (torch.tensor([0, 2, 2, 5]), r"cu_seqlens=\[0, 2, 2, 5\] .* strictly increasing"),
    (torch.tensor([0, 3, 2, 5]), r"cu_seqlens=\[0, 3, 2, 5\] .* strictly increasing"),
    ([0, 2, 5], r"cu_seqlens must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize(("cu", "message"), BAD, ids=[m[:30] for _, m in BAD])
@pytest.mark.parametrize("name", ["softmax", "nystrom"])
def test_bad_cu_seqlens_are_refused(name, cu, message):
    causal = name == "softmax"
    q, k, v = packed_qkv(5, seed=0)
    with pytest.raises(ValueError, match=message):
        attention.build(name)(q, k, v, causal=causal, cu_seqlens=cu)


def test_packed_input_needs_one_row_and_no_mask():
    q, k, v = (t.expand(2, -1, -1, -1) for t in packed_qkv(5, seed=0))
    kernel = attention.build("softmax")
    with pytest.raises(ValueError, match="cu_seqlens needs a batch size of 1.*got B=2"):
        kernel(q, k, v, causal=True, cu_seqlens=offsets([2, 3]))
    mask = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask cannot be combined with cu_seqlens"):
        kernel(*(t[:1] for t in (q, k, v)), mask, causal=True, cu_seqlens=offsets([2, 3]))


def test_a_packing_given_as_cu_seqlens_is_used_as_is():
    q, k, v = packed_qkv(6, seed=5)
    kernel = attention.build("softmax")
    packing = Packing((0, 4, 6))
    out = kernel(q, k, v, causal=True, cu_seqlens=packing)
    assert torch.equal(out, kernel(q, k, v, causal=True, cu_seqlens=offsets([4, 2])))
