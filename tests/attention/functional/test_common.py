"""The shared checks and the packed-sequence driver of the functional ops."""

import math

import pytest
import torch

from formerlab.attention.functional._common import (
    cast,
    check_chunk_size,
    check_cu_seqlens,
    check_initial_state,
    check_per_token,
    check_qkv,
    resolve_scale,
    run_per_sequence,
    transpose_state,
    work_dtype,
)


def _qkv(b=2, t=5, h=3, k=4, v=6, dtype=torch.float32):
    return (
        torch.randn(b, t, h, k, dtype=dtype),
        torch.randn(b, t, h, k, dtype=dtype),
        torch.randn(b, t, h, v, dtype=dtype),
    )


def test_check_qkv_returns_sizes():
    assert check_qkv(*_qkv()) == (2, 5, 3, 4, 6)


_GOOD = _qkv()


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("q", ("not a tensor", _GOOD[1], _GOOD[2])),
        ("q", (_GOOD[0].long(), _GOOD[1], _GOOD[2])),
        ("q", (_GOOD[0][0], _GOOD[1], _GOOD[2])),  # rank 3
        ("q", (_GOOD[0][:, :0], _GOOD[1][:, :0], _GOOD[2][:, :0])),  # T = 0
        ("k", (_GOOD[0], _GOOD[1][..., :3], _GOOD[2])),
        ("k", (_GOOD[0], _GOOD[1].int(), _GOOD[2])),
        ("v", (_GOOD[0], _GOOD[1], _GOOD[2][:, :4])),
        ("v", (_GOOD[0], _GOOD[1], _GOOD[2][0])),
        ("v", (_GOOD[0], _GOOD[1], _GOOD[2][..., :0])),
    ],
)
def test_check_qkv_rejects_naming_the_argument(name, args):
    with pytest.raises(ValueError, match=rf"^{name} "):
        check_qkv(*args)


def test_check_qkv_message_shows_shape_and_layout():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        check_qkv(q, k[:, :, :2], v)
    assert "(2, 5, 2, 4)" in str(info.value) and "[B, T, H, K]" in str(info.value)


def test_check_per_token():
    g = torch.randn(2, 5, 3)
    assert check_per_token("g", g, (2, 5, 3), "[B, T, H]") is g
    with pytest.raises(ValueError, match=r"^g has shape \(2, 5, 3\), expected \[B, T, H, K\]"):
        check_per_token("g", g, (2, 5, 3, 4), "[B, T, H, K]")
    with pytest.raises(ValueError, match="^beta must be a floating-point tensor"):
        check_per_token("beta", g.long(), (2, 5, 3))
    with pytest.raises(ValueError, match="^beta must be a torch.Tensor"):
        check_per_token("beta", [1.0], (1,))


def test_check_cu_seqlens_valid():
    assert check_cu_seqlens(None, 4, 10) is None
    assert check_cu_seqlens(torch.tensor([0, 3, 10]), 1, 10) == (0, 3, 10)
    assert check_cu_seqlens(torch.tensor([0, 10], dtype=torch.int32), 1, 10) == (0, 10)


@pytest.mark.parametrize(
    ("offsets", "batch", "fragment"),
    [
        (torch.tensor([0.0, 10.0]), 1, "dtype"),
        (torch.tensor([[0, 10]]), 1, "shape"),
        (torch.tensor([0]), 1, "shape"),
        (torch.tensor([1, 10]), 1, "strictly increasing"),
        (torch.tensor([0, 9]), 1, "T=10"),
        (torch.tensor([0, 5, 5, 10]), 1, "strictly increasing"),
        (torch.tensor([0, 6, 4, 10]), 1, "strictly increasing"),
        (torch.tensor([0, 10]), 2, "B=2"),
        ([0, 10], 1, "torch.Tensor"),
    ],
)
def test_check_cu_seqlens_rejects(offsets, batch, fragment):
    with pytest.raises(ValueError, match="^cu_seqlens") as info:
        check_cu_seqlens(offsets, batch, 10)
    assert fragment in str(info.value)


def test_check_initial_state():
    state = torch.zeros(2, 3, 4, 5)
    assert check_initial_state(None, 2, 3, 4, 5) is None
    assert check_initial_state(state, 2, 3, 4, 5) is state
    with pytest.raises(ValueError, match=r"^initial_state has shape \(2, 3, 4, 5\)") as info:
        check_initial_state(state, 3, 3, 4, 5, packed=True)
    assert "S=3 sequences in cu_seqlens" in str(info.value)
    with pytest.raises(ValueError, match="batch size B=2"):
        check_initial_state(state, 2, 3, 5, 4, layout="[N, H, V, K]")
    with pytest.raises(ValueError, match="^initial_state must be a floating-point"):
        check_initial_state(state.long(), 2, 3, 4, 5)


def test_resolve_scale():
    assert resolve_scale(None, 16) == 0.25
    assert resolve_scale(2, 16) == 2.0
    for bad in (0, -1.0, math.nan, math.inf, "0.5", True, torch.tensor(0.5)):
        with pytest.raises(ValueError, match="^scale="):
            resolve_scale(bad, 16)


def test_check_chunk_size():
    for good in (1, 2, 16, 64, 128):
        assert check_chunk_size(good) == good
    for bad in (0, -64, 3, 48, 64.0, True, None):
        with pytest.raises(ValueError, match="^chunk_size="):
            check_chunk_size(bad)


def test_work_dtype_and_cast():
    half, single, double = (
        torch.zeros(1, dtype=d) for d in (torch.bfloat16, torch.float32, torch.float64)
    )
    assert work_dtype(half) == torch.float32
    assert work_dtype(torch.zeros(1, dtype=torch.float16), None) == torch.float32
    assert work_dtype(single, None, half) == torch.float32
    assert work_dtype(half, double) == torch.float64
    assert work_dtype() == torch.float32
    out = cast(torch.float64, half, None)
    assert out[0].dtype == torch.float64 and out[1] is None


def test_transpose_state():
    state = torch.randn(2, 3, 4, 5)
    assert transpose_state(None) is None
    assert torch.equal(transpose_state(state), state.transpose(-1, -2))


def _toy_core(x, y, state):
    """A causal core with a state: o_t = state_sum + cumsum(x * y)_t; final = state + sum."""
    prod = x if y is None else x * y
    offset = 0.0 if state is None else state.sum((-1, -2))[:, None, :, None]
    o = prod.cumsum(1) + offset
    carried = prod.sum(1)[:, :, None, :]  # [B, H, 1, V]
    final = carried if state is None else state + carried
    return o, final


def test_run_per_sequence_without_offsets_calls_core_once():
    x, y = torch.randn(2, 7, 3, 4), torch.randn(2, 7, 3, 4)
    o, final = run_per_sequence(_toy_core, (x, y), None, None)
    ref_o, ref_final = _toy_core(x, y, None)
    assert torch.equal(o, ref_o) and torch.equal(final, ref_final)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_y", [False, True])
def test_run_per_sequence_equals_each_sequence_alone(with_state, with_y):
    offsets = (0, 2, 7, 8)
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True) if with_y else None
    state = torch.randn(3, 3, 1, 4, dtype=torch.float64, requires_grad=True) if with_state else None
    o, final = run_per_sequence(_toy_core, (x, y), state, offsets)
    assert o.shape == (1, 8, 3, 4) and final.shape == (3, 3, 1, 4)
    weights = torch.randn_like(o), torch.randn_like(final)
    leaves = [t for t in (x, y, state) if t is not None]
    grads = torch.autograd.grad((o * weights[0]).sum() + (final * weights[1]).sum(), leaves)

    outs, finals = [], []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        piece_y = None if y is None else y[:, a:b]
        piece_state = None if state is None else state[i : i + 1]
        oi, fi = _toy_core(x[:, a:b], piece_y, piece_state)
        outs.append(oi)
        finals.append(fi)
    ref_o, ref_final = torch.cat(outs, 1), torch.cat(finals, 0)
    ref_grads = torch.autograd.grad(
        (ref_o * weights[0]).sum() + (ref_final * weights[1]).sum(), leaves
    )
    torch.testing.assert_close(o, ref_o, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # nothing crosses a boundary: the second sequence starts from its own state only
    first = x[:, 2] if y is None else x[:, 2] * y[:, 2]
    offset = 0.0 if state is None else state[1].sum((-1, -2))[None, :, None]
    torch.testing.assert_close(o[:, 2], first + offset, rtol=0, atol=1e-12)


def test_run_per_sequence_returns_none_state_when_core_has_none():
    def core(x, state):
        return x * 2, None

    o, final = run_per_sequence(core, (torch.ones(1, 4, 1, 1),), None, (0, 1, 4))
    assert final is None and torch.equal(o, torch.full((1, 4, 1, 1), 2.0))
