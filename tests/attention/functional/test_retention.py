"""Retention (RetNet): a fixed decay ``gamma_h = 1 - 2^(-5-h)`` per head.

Ground truth: the recurrence ``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``
(Sun et al., 2023) written below in float64; fla's naive ``naive_retention`` (head-first
layout, loaded by file path) as a peer; gradcheck.
"""

import ast
import importlib.metadata
import importlib.util
import inspect

import pytest
import torch

from formerlab.attention.functional import (
    chunk_retention,
    chunk_simple_gla,
    fused_recurrent_retention,
    retention_log_decay,
)

F64 = torch.float64
OPS = [chunk_retention, fused_recurrent_retention]


def reference(q, k, v, scale=None, initial_state=None):
    """The retention recurrence in float64 with RetNet's decays written out."""
    q, k, v = (x.to(F64) for x in (q, k, v))
    batch, seq_len, heads, key_dim = q.shape
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(heads)], dtype=F64)
    scale = key_dim**-0.5 if scale is None else scale
    if initial_state is None:
        state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=F64)
    else:
        state = initial_state.to(F64)
    outputs = []
    for t in range(seq_len):
        state = gamma[:, None, None] * state + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def make(b=2, t=37, h=4, k=8, v=6, *, dtype=F64, seed=0, state=True):
    gen = torch.Generator().manual_seed(seed)
    q, kk = (torch.randn(b, t, h, k, generator=gen, dtype=F64) for _ in range(2))
    vv = torch.randn(b, t, h, v, generator=gen, dtype=F64)
    h0 = torch.randn(b, h, k, v, generator=gen, dtype=F64) if state else None
    return (*(x.to(dtype) for x in (q, kk, vv)), None if h0 is None else h0.to(dtype))


def call(op, *args, chunk=None, **kwargs):
    if op is chunk_retention and chunk is not None:
        kwargs["chunk_size"] = chunk
    return op(*args, **kwargs)


def test_decay_per_head_is_exactly_retnet_gamma():
    heads = 12
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(heads)], dtype=F64)
    torch.testing.assert_close(retention_log_decay(heads).exp(), gamma, rtol=1e-15, atol=0)
    # through the ops: zero keys, a state of ones, three tokens -> the state is gamma^3
    zeros_k = torch.zeros(1, 3, heads, 2, dtype=F64)
    v = torch.randn(1, 3, heads, 2, dtype=F64)
    ones = torch.ones(1, heads, 2, 2, dtype=F64)
    for op in OPS:
        _, final = op(zeros_k, zeros_k, v, initial_state=ones, output_final_state=True)
        torch.testing.assert_close(
            final, (gamma**3)[None, :, None, None].expand_as(final), rtol=1e-14, atol=0
        )


def test_output_decays_by_gamma_per_token():
    """One key-value pair at t = 0 is read back at t with weight scale * gamma_h^t."""
    heads, steps = 3, 6
    q = torch.zeros(1, steps, heads, 2, dtype=F64)
    q[..., 0] = 1.0
    k = torch.zeros_like(q)
    k[:, 0, :, 0] = 1.0
    v = torch.ones(1, steps, heads, 1, dtype=F64)
    expected = torch.tensor(
        [[(1 - 2.0 ** (-5 - h)) ** t for h in range(heads)] for t in range(steps)], dtype=F64
    )
    for op in OPS:
        o, _ = op(q, k, v, scale=1.0)
        torch.testing.assert_close(o[0, :, :, 0], expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(
    ("op", "chunk"),
    [
        (chunk_retention, 1),
        (chunk_retention, 16),
        (chunk_retention, 64),
        (fused_recurrent_retention, None),
    ],
)
def test_matches_recurrence_float64(op, chunk, with_state):
    q, k, v, h0 = make(t=77, state=with_state)
    o, final = call(op, q, k, v, chunk=chunk, scale=0.3, initial_state=h0, output_final_state=True)
    ref_o, ref_final = reference(q, k, v, scale=0.3, initial_state=h0)
    assert o.dtype == F64 and o.shape == v.shape
    assert (o - ref_o).abs().max() <= 1e-10 and (final - ref_final).abs().max() <= 1e-10
    assert call(op, q, k, v, chunk=chunk)[1] is None


def test_float32_matches_float64_recurrence():
    q, k, v, h0 = make(b=1, t=300, h=6, k=16, v=16, dtype=torch.float32, seed=1)
    ref_o, ref_final = reference(q, k, v, initial_state=h0)
    for op in OPS:
        o, final = op(q, k, v, initial_state=h0, output_final_state=True)
        assert o.dtype == torch.float32
        assert ((o - ref_o).abs().max() / ref_o.abs().max()) <= 1e-5
        assert ((final - ref_final).abs().max() / ref_final.abs().max()) <= 1e-5


def test_equals_simple_gla_with_fixed_log_decay():
    """fla defines retention as simple GLA with g_gamma = log(1 - 2^(-5-h))."""
    q, k, v, h0 = make(t=50)
    g_gamma = torch.log(1 - 2.0 ** (-5.0 - torch.arange(4, dtype=F64)))
    ours = chunk_retention(q, k, v, initial_state=h0, output_final_state=True)
    gla = chunk_simple_gla(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True)
    assert (ours[0] - gla[0]).abs().max() <= 1e-12 and (ours[1] - gla[1]).abs().max() <= 1e-12


def test_reverse_and_state_v_first():
    q, k, v, h0 = make(t=20)
    o, final = fused_recurrent_retention(q, k, v, reverse=True, output_final_state=True)
    ref_o, ref_final = reference(q.flip(1), k.flip(1), v.flip(1))
    assert (o - ref_o.flip(1)).abs().max() <= 1e-12 and (final - ref_final).abs().max() <= 1e-12
    swapped = fused_recurrent_retention(
        q, k, v, initial_state=h0.transpose(-1, -2), output_final_state=True, state_v_first=True
    )
    plain = fused_recurrent_retention(q, k, v, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(swapped[0], plain[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(swapped[1], plain[1].transpose(-1, -2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_packed_sequences_equal_each_sequence_alone(op):
    offsets = [0, 3, 30, 47]
    q, k, v, _ = make(b=1, t=47, seed=2)
    h0 = torch.randn(3, 4, 8, 6, dtype=F64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, h0)]
    cu = torch.tensor(offsets)
    o, final = call(
        op, *leaves[:3], chunk=16, initial_state=leaves[3], output_final_state=True, cu_seqlens=cu
    )
    w_o, w_s = torch.randn_like(o), torch.randn_like(final)
    grads = torch.autograd.grad((o * w_o).sum() + (final * w_s).sum(), leaves)
    alone = [x.clone().requires_grad_() for x in (q, k, v, h0)]
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        piece = [x[:, a:b] for x in alone[:3]]
        oi, fi = call(
            op, *piece, chunk=16, initial_state=alone[3][i : i + 1], output_final_state=True
        )
        outs.append(oi)
        finals.append(fi)
    ref_o, ref_final = torch.cat(outs, 1), torch.cat(finals, 0)
    ref_grads = torch.autograd.grad((ref_o * w_o).sum() + (ref_final * w_s).sum(), alone)
    assert (o - ref_o).abs().max() <= 1e-12 and (final - ref_final).abs().max() <= 1e-12
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max() <= 1e-12


@pytest.mark.parametrize("op", OPS)
def test_streaming_equals_one_call(op):
    q, k, v, h0 = make(t=40, seed=3)
    whole = call(op, q, k, v, chunk=16, initial_state=h0, output_final_state=True)
    o1, s1 = call(
        op, q[:, :23], k[:, :23], v[:, :23], chunk=16, initial_state=h0, output_final_state=True
    )
    o2, s2 = call(
        op, q[:, 23:], k[:, 23:], v[:, 23:], chunk=16, initial_state=s1, output_final_state=True
    )
    assert (torch.cat([o1, o2], 1) - whole[0]).abs().max() <= 1e-12
    assert (s2 - whole[1]).abs().max() <= 1e-12


def test_gradcheck_chunk_retention():
    q, k, v, h0 = make(b=1, t=5, h=2, k=2, v=2, seed=4)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, h0)]

    def fn(q, k, v, h0):
        return chunk_retention(q, k, v, initial_state=h0, output_final_state=True, chunk_size=2)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("op", OPS)
def test_half_precision_inputs(op, dtype, tol):
    q, k, v, h0 = make(t=40, dtype=dtype, seed=5)
    o, final = op(q, k, v, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32
    ref_o, ref_final = reference(q, k, v, initial_state=h0)
    assert ((o.to(F64) - ref_o).abs().max() / ref_o.abs().max()) <= tol
    assert ((final.to(F64) - ref_final).abs().max() / ref_final.abs().max()) <= 1e-5


def _bad_cases():
    q, k, v, h0 = make(b=2, t=6, h=3, k=4, v=5)
    return [
        ("q", lambda: chunk_retention(q[0], k, v)),
        ("k", lambda: fused_recurrent_retention(q, k[..., :3], v)),
        ("v", lambda: chunk_retention(q, k, v[:1])),
        ("scale", lambda: chunk_retention(q, k, v, scale=0)),
        ("initial_state", lambda: chunk_retention(q, k, v, initial_state=h0[:, :2])),
        (
            "initial_state",
            lambda: fused_recurrent_retention(q, k, v, initial_state=h0, state_v_first=True),
        ),
        ("cu_seqlens", lambda: chunk_retention(q, k, v, cu_seqlens=torch.tensor([0, 6]))),
        (
            "cu_seqlens",
            lambda: fused_recurrent_retention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 7])),
        ),
        ("chunk_size", lambda: chunk_retention(q, k, v, chunk_size=0)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_raises_naming_the_argument(index):
    name, call_ = _bad_cases()[index]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call_()


# ----------------------------------------------------------------------------- fla peer
def _fla_file(relative):
    try:
        dist = importlib.metadata.distribution("fla-core")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fla-core is not installed (test peer only)")
    return dist.locate_file(relative)


def test_peer_fla_naive_retention():
    """fla's naive_retention takes head-first [B, H, T, D] tensors, no state, float32 math."""
    spec = importlib.util.spec_from_file_location(
        "fla_peer_retention_naive", _fla_file("fla/ops/retention/naive.py")
    )
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    q, k, v, _ = (
        x.float() if x is not None else None for x in make(t=60, h=5, state=False, seed=6)
    )
    peer = naive.naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    for op in OPS:
        torch.testing.assert_close(op(q, k, v)[0], peer, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("relative", "op"),
    [
        ("fla/ops/retention/chunk.py", chunk_retention),
        ("fla/ops/retention/fused_recurrent.py", fused_recurrent_retention),
    ],
)
def test_signature_matches_fla(relative, op):
    tree = ast.parse(_fla_file(relative).read_text())
    node = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == op.__name__
    )
    names = [a.arg for a in node.args.args]
    defaults = dict(
        zip(
            names[len(names) - len(node.args.defaults) :],
            (ast.literal_eval(d) for d in node.args.defaults),
        )
    )
    params = inspect.signature(op).parameters.values()
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == names
    assert {p.name: p.default for p in positional if p.default is not p.empty} == defaults
    keyword_only = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only in ({}, {"chunk_size": 64})  # fla reads chunk_size from **kwargs
