"""GLA and simple GLA: chunked and recurrent ops against an independent float64 recurrence.

Ground truth: the gated recurrence ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T``,
``o_t = scale * S_t^T q_t`` (Yang et al., 2024) written below in float64, token by token;
fla's pure-PyTorch naive modules (loaded by file path, no Triton) as a peer; gradcheck.
"""

import ast
import importlib.metadata
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F

import formerlab.attention.functional.gla as gla_module
from formerlab.attention.functional import (
    chunk_gla,
    chunk_simple_gla,
    fused_recurrent_gla,
    fused_recurrent_simple_gla,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- references
def reference(q, k, v, gk=None, gv=None, scale=None, initial_state=None):
    """The gated linear recurrence in float64, one token at a time."""
    q, k, v = (x.to(F64) for x in (q, k, v))
    batch, seq_len, heads, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    if initial_state is None:
        state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=F64)
    else:
        state = initial_state.to(F64)
    outputs = []
    for t in range(seq_len):
        if gk is not None:
            state = torch.exp(gk[:, t].to(F64)).unsqueeze(-1) * state
        if gv is not None:
            state = state * torch.exp(gv[:, t].to(F64)).unsqueeze(-2)
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def per_key(g, key_dim):
    """A scalar log decay ``[B, T, H]`` as the equivalent per-key one ``[B, T, H, K]``."""
    return g.unsqueeze(-1).expand(*g.shape, key_dim)


def make(b=2, t=29, h=3, k=8, v=5, *, key_gate, dtype=F64, seed=0, state=True):
    """Random inputs; log decays from logsigmoid, mixing fast and slow decays."""
    gen = torch.Generator().manual_seed(seed)
    q, kk = (torch.randn(b, t, h, k, generator=gen, dtype=F64) for _ in range(2))
    vv = torch.randn(b, t, h, v, generator=gen, dtype=F64)
    gate_shape = (b, t, h, k) if key_gate else (b, t, h)
    g = F.logsigmoid(2 * torch.randn(*gate_shape, generator=gen, dtype=F64) + 1)
    h0 = torch.randn(b, h, k, v, generator=gen, dtype=F64) if state else None
    cast = [x.to(dtype) for x in (q, kk, vv, g)]
    return (*cast, None if h0 is None else h0.to(dtype))


#: name -> (op, gate per key?, chunked?)
OPS = {
    "chunk_gla": (chunk_gla, True, True),
    "fused_recurrent_gla": (fused_recurrent_gla, True, False),
    "chunk_simple_gla": (chunk_simple_gla, False, True),
    "fused_recurrent_simple_gla": (fused_recurrent_simple_gla, False, False),
}


def run(name, q, k, v, g, chunk=None, **kwargs):
    """Call op ``name`` with the gate in its fla argument slot and an optional chunk size."""
    op, _, chunked = OPS[name]
    if chunked and chunk is not None:
        if op is chunk_gla:
            old, gla_module.GLA_CHUNK_SIZE = gla_module.GLA_CHUNK_SIZE, chunk
            try:
                return op(q, k, v, g, **kwargs)
            finally:
                gla_module.GLA_CHUNK_SIZE = old
        kwargs["chunk_size"] = chunk
    return op(q, k, v, g, **kwargs)


def ref_for(name, q, k, v, g, **kwargs):
    key_dim = q.shape[-1]
    return reference(q, k, v, g if OPS[name][1] else per_key(g, key_dim), **kwargs)


def max_rel(got, want):
    return ((got.to(F64) - want).abs().max() / want.abs().max()).item()


# ----------------------------------------------------------------------------- agreement
_AGREEMENT = [(name, chunk) for name in OPS for chunk in ((1, 8, 64) if OPS[name][2] else (None,))]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(("name", "chunk"), _AGREEMENT)
def test_matches_recurrence_float64(name, chunk, with_state):
    q, k, v, g, h0 = make(t=77, key_gate=OPS[name][1], state=with_state)
    o, final = run(name, q, k, v, g, chunk, initial_state=h0, output_final_state=True, scale=0.4)
    ref_o, ref_final = ref_for(name, q, k, v, g, scale=0.4, initial_state=h0)
    assert o.dtype == F64 and o.shape == v.shape and final.shape == (2, 3, 8, 5)
    assert (o - ref_o).abs().max() <= 1e-10
    assert (final - ref_final).abs().max() <= 1e-10
    assert run(name, q, k, v, g, chunk)[1] is None


@pytest.mark.parametrize("op", [chunk_simple_gla, fused_recurrent_simple_gla])
@pytest.mark.parametrize("gates", ["g", "g_gamma", "both", "none"])
def test_simple_gla_decay_arguments(op, gates):
    q, k, v, g, h0 = make(t=21, key_gate=False)
    g_gamma = torch.tensor([-0.05, -0.7, -3.0], dtype=F64)
    kwargs = {"g": g if gates in ("g", "both") else None}
    kwargs["g_gamma"] = g_gamma if gates in ("g_gamma", "both") else None
    extra = {"chunk_size": 8} if op is chunk_simple_gla else {}
    o, final = op(q, k, v, **kwargs, initial_state=h0, output_final_state=True, **extra)
    total = None
    if kwargs["g"] is not None or kwargs["g_gamma"] is not None:
        # both given: both decays apply (their log decays add), as in fla's kernels
        total = (kwargs["g"] if kwargs["g"] is not None else 0) + (
            g_gamma if kwargs["g_gamma"] is not None else 0
        )
        total = per_key(total.expand(2, 21, 3), 8)
    ref_o, ref_final = reference(q, k, v, total, initial_state=h0)
    assert (o - ref_o).abs().max() <= 1e-10 and (final - ref_final).abs().max() <= 1e-10


def test_long_sequence_float32():
    """T = 2048 in float32: within 1e-4 (relative) of the float64 recurrence."""
    for name in ("chunk_gla", "chunk_simple_gla"):
        q, k, v, g, h0 = make(b=1, t=2048, h=2, k=16, v=16, key_gate=OPS[name][1], seed=3)
        args32 = [x.float() for x in (q, k, v, g, h0)]
        o, final = run(name, *args32[:4], initial_state=args32[4], output_final_state=True)
        ref_o, ref_final = ref_for(name, *args32[:4], initial_state=args32[4])
        assert o.dtype == torch.float32 and final.dtype == torch.float32
        assert max_rel(o, ref_o) <= 1e-4, name
        assert max_rel(final, ref_final) <= 1e-4, name


def test_fused_recurrent_gla_value_decay_and_reverse():
    q, k, v, gk, h0 = make(t=13, key_gate=True)
    gv = F.logsigmoid(torch.randn(2, 13, 3, 5, dtype=F64))
    o, final = fused_recurrent_gla(q, k, v, gk, gv, initial_state=h0, output_final_state=True)
    ref_o, ref_final = reference(q, k, v, gk, gv, initial_state=h0)
    assert (o - ref_o).abs().max() <= 1e-12 and (final - ref_final).abs().max() <= 1e-12

    o, final = fused_recurrent_gla(q, k, v, gk, reverse=True, output_final_state=True)
    flipped = [x.flip(1) for x in (q, k, v, gk)]
    ref_o, ref_final = reference(*flipped)
    assert (o - ref_o.flip(1)).abs().max() <= 1e-12
    assert (final - ref_final).abs().max() <= 1e-12


def test_state_v_first_transposes_the_state():
    q, k, v, g, h0 = make(t=19, key_gate=True)
    for name in ("chunk_gla", "fused_recurrent_gla", "chunk_simple_gla"):
        gate = g if OPS[name][1] else g[..., 0]
        plain = run(name, q, k, v, gate, initial_state=h0, output_final_state=True)
        swapped = run(
            name,
            q,
            k,
            v,
            gate,
            initial_state=h0.transpose(-1, -2).contiguous(),
            output_final_state=True,
            state_v_first=True,
        )
        torch.testing.assert_close(swapped[0], plain[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(swapped[1], plain[1].transpose(-1, -2), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- packing, streaming
@pytest.mark.parametrize("name", list(OPS))
def test_packed_sequences_equal_each_sequence_alone(name):
    """cu_seqlens: values and gradients equal separate calls; nothing crosses a boundary."""
    offsets = [0, 5, 41, 60]
    q, k, v, g, _ = make(b=1, t=60, key_gate=OPS[name][1], seed=5)
    h0 = torch.randn(3, 3, 8, 5, dtype=F64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    cu = torch.tensor(offsets, dtype=torch.int32)
    o, final = run(
        name, *leaves[:4], 16, initial_state=leaves[4], output_final_state=True, cu_seqlens=cu
    )
    w_o, w_s = torch.randn_like(o), torch.randn_like(final)
    grads = torch.autograd.grad((o * w_o).sum() + (final * w_s).sum(), leaves)

    alone = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        piece = [x[:, a:b] for x in alone[:4]]
        oi, fi = run(name, *piece, 16, initial_state=alone[4][i : i + 1], output_final_state=True)
        outs.append(oi)
        finals.append(fi)
    ref_o, ref_final = torch.cat(outs, 1), torch.cat(finals, 0)
    ref_grads = torch.autograd.grad((ref_o * w_o).sum() + (ref_final * w_s).sum(), alone)
    assert (o - ref_o).abs().max() <= 1e-12 and (final - ref_final).abs().max() <= 1e-12
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max() <= 1e-12
    # and the packed call equals the float64 recurrence run per sequence
    ref0 = ref_for(name, *(x[:, 5:41] for x in (q, k, v, g)), initial_state=h0[1:2])
    assert (o[:, 5:41] - ref0[0]).abs().max() <= 1e-10


@pytest.mark.parametrize("split", [17, 44])
@pytest.mark.parametrize("name", list(OPS))
def test_streaming_equals_one_call(name, split):
    """T1 tokens, then T2 tokens from the returned state == one call on T1 + T2."""
    q, k, v, g, h0 = make(t=45, key_gate=OPS[name][1], seed=7)
    whole_o, whole_final = run(name, q, k, v, g, 8, initial_state=h0, output_final_state=True)
    first = [x[:, :split] for x in (q, k, v, g)]
    second = [x[:, split:] for x in (q, k, v, g)]
    o1, s1 = run(name, *first, 8, initial_state=h0, output_final_state=True)
    o2, s2 = run(name, *second, 8, initial_state=s1, output_final_state=True)
    assert (torch.cat([o1, o2], 1) - whole_o).abs().max() <= 1e-12
    assert (s2 - whole_final).abs().max() <= 1e-12


def test_initial_state_is_not_modified():
    q, k, v, g, h0 = make(t=10, key_gate=True)
    before = h0.clone()
    for name in OPS:
        gate = g if OPS[name][1] else g[..., 0]
        run(name, q, k, v, gate, initial_state=h0, output_final_state=True)
    assert torch.equal(h0, before)


# ----------------------------------------------------------------------------- gradients
def test_gradcheck_chunk_gla(monkeypatch):
    monkeypatch.setattr(gla_module, "GLA_CHUNK_SIZE", 4)  # 9 tokens: three chunks, padded
    q, k, v, g, h0 = make(b=2, t=9, h=2, k=3, v=2, key_gate=True, seed=11)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]

    def fn(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, scale=0.7, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_chunk_simple_gla():
    q, k, v, g, h0 = make(b=1, t=5, h=2, k=2, v=2, key_gate=False, seed=12)
    g_gamma = torch.tensor([-0.3, -1.1], dtype=F64)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, g_gamma, h0)]

    def fn(q, k, v, g, g_gamma, h0):
        return chunk_simple_gla(
            q, k, v, g, g_gamma, initial_state=h0, output_final_state=True, chunk_size=2
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_packed_chunk_gla(monkeypatch):
    monkeypatch.setattr(gla_module, "GLA_CHUNK_SIZE", 2)
    q, k, v, g, _ = make(b=1, t=6, h=1, k=2, v=2, key_gate=True, seed=13)
    h0 = torch.randn(2, 1, 2, 2, dtype=F64)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    cu = torch.tensor([0, 2, 6])

    def fn(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_fused_recurrent_gla():
    q, k, v, gk, h0 = make(b=1, t=4, h=1, k=3, v=2, key_gate=True, seed=14)
    gv = F.logsigmoid(torch.randn(1, 4, 1, 2, dtype=F64))
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gk, gv, h0)]

    def fn(q, k, v, gk, gv, h0):
        return fused_recurrent_gla(q, k, v, gk, gv, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", ["chunk_gla", "chunk_simple_gla"])
def test_gradients_match_recurrence(name):
    """Gradients of every input (q, k, v, g, initial_state) equal the recurrence's."""
    q, k, v, g, h0 = make(t=70, key_gate=OPS[name][1], seed=15)
    chunked = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    recurrent = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, s = run(name, *chunked[:4], initial_state=chunked[4], output_final_state=True)
    ro, rs = ref_for(name, *recurrent[:4], initial_state=recurrent[4])
    w_o, w_s = torch.randn_like(o), torch.randn_like(s)
    got = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), chunked)
    want = torch.autograd.grad((ro * w_o).sum() + (rs * w_s).sum(), recurrent)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item())


def _saved_elements(fn):
    """Elements autograd keeps for backward (distinct storages)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("name", ["chunk_gla", "chunk_simple_gla"])
def test_backward_keeps_per_chunk_not_per_token_states(name):
    t, key_dim, value_dim = 512, 16, 64
    q, k, v, g, _ = make(b=1, t=t, h=1, k=key_dim, v=value_dim, key_gate=OPS[name][1])
    leaves = [x.float().requires_grad_() for x in (q, k, v, g)]
    per_token_states = t * key_dim * value_dim
    chunked = _saved_elements(lambda: run(name, *leaves))
    recurrent_name = name.replace("chunk", "fused_recurrent")
    recurrent = _saved_elements(lambda: run(recurrent_name, *leaves))
    assert recurrent >= per_token_states  # the measure sees per-token states...
    assert chunked < per_token_states / 2  # ...and the chunked form keeps none


# ----------------------------------------------------------------------------- dtypes, decay
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("name", ["chunk_gla", "chunk_simple_gla", "fused_recurrent_gla"])
def test_half_precision_inputs(name, dtype, tol):
    q, k, v, g, h0 = make(t=40, key_gate=OPS[name][1], dtype=dtype, seed=17)
    o, final = run(name, q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32
    ref_o, ref_final = ref_for(name, q, k, v, g, initial_state=h0)  # same rounded inputs
    assert max_rel(o, ref_o) <= tol
    assert max_rel(final, ref_final) <= 1e-5  # the state never leaves float32


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", ["chunk_gla", "chunk_simple_gla"])
def test_strong_decay_is_stable(name, dtype):
    """g = -20 per token (and -200 spikes) gives finite values and gradients, exactly."""
    q, k, v, g, h0 = make(t=100, key_gate=OPS[name][1], seed=19)
    g = torch.full_like(g, -20.0)
    g[:, ::7] = -200.0
    if OPS[name][1]:
        g[..., :2] = 0.0  # some channels never decay, the others decay hard
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, g, h0)]
    o, final = run(name, *leaves[:4], initial_state=leaves[4], output_final_state=True)
    ((o * o).sum() + final.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    ref_o, ref_final = ref_for(
        name, *(x.detach() for x in leaves[:4]), initial_state=leaves[4].detach()
    )
    assert max_rel(o, ref_o) <= (1e-12 if dtype == F64 else 1e-5)
    assert max_rel(final, ref_final) <= (1e-12 if dtype == F64 else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(OPS))
def test_runs_on_cuda_like_on_cpu(name):
    """Any device: the same op on CUDA matches the float64 recurrence, gradients included."""
    q, k, v, g, h0 = make(t=70, key_gate=OPS[name][1], seed=23)
    on_gpu = [x.cuda().requires_grad_() for x in (q, k, v, g, h0)]
    o, final = run(name, *on_gpu[:4], initial_state=on_gpu[4], output_final_state=True)
    assert o.is_cuda and final.is_cuda
    (o.sum() + final.sum()).backward()
    on_cpu = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    ref_o, ref_final = ref_for(name, *on_cpu[:4], initial_state=on_cpu[4])
    (ref_o.sum() + ref_final.sum()).backward()
    assert (o.cpu() - ref_o).abs().max() <= 1e-10 and (final.cpu() - ref_final).abs().max() <= 1e-10
    for got, want in zip(on_gpu, on_cpu):
        assert (got.grad.cpu() - want.grad).abs().max() <= 1e-9


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    q, k, v, gk, h0 = make(b=2, t=6, h=3, k=4, v=5, key_gate=True)
    g = gk[..., 0]
    packed = [x[:1] for x in (q, k, v, gk)]
    cu = torch.tensor([0, 2, 6])
    return [
        ("g", lambda: chunk_gla(q, k, v, g)),
        ("g", lambda: chunk_gla(q, k, v, gk.long())),
        ("g", lambda: chunk_simple_gla(q, k, v, gk)),
        ("g", lambda: fused_recurrent_simple_gla(q, k, v, g[:, :3])),
        ("g_gamma", lambda: chunk_simple_gla(q, k, v, g_gamma=torch.zeros(3, 1))),
        ("gk", lambda: fused_recurrent_gla(q, k, v, g)),
        ("gv", lambda: fused_recurrent_gla(q, k, v, gk, gk)),
        ("chunk_size", lambda: chunk_simple_gla(q, k, v, g, chunk_size=48)),
        ("scale", lambda: chunk_gla(q, k, v, gk, scale=-1.0)),
        ("scale", lambda: fused_recurrent_simple_gla(q, k, v, g, scale=float("nan"))),
        ("initial_state", lambda: chunk_gla(q, k, v, gk, initial_state=h0[:1])),
        (
            "initial_state",
            lambda: chunk_simple_gla(q, k, v, g, initial_state=h0, state_v_first=True),
        ),
        ("initial_state", lambda: chunk_gla(*packed, initial_state=h0[:1], cu_seqlens=cu)),
        ("cu_seqlens", lambda: chunk_gla(q, k, v, gk, cu_seqlens=cu)),
        (
            "cu_seqlens",
            lambda: chunk_simple_gla(*packed[:3], g[:1], cu_seqlens=torch.tensor([0, 4])),
        ),
        ("cu_seqlens", lambda: fused_recurrent_gla(*packed, cu_seqlens=cu.float())),
        ("q", lambda: chunk_gla(q[0], k[0], v[0], gk[0])),
        ("k", lambda: chunk_simple_gla(q, k[:, :5], v, g)),
        ("v", lambda: fused_recurrent_gla(q, k, v[:, :, :2], gk)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_raises_naming_the_argument(index):
    name, call = _bad_cases()[index]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()


# ----------------------------------------------------------------------------- fla peer
def _fla_file(relative):
    try:
        dist = importlib.metadata.distribution("fla-core")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fla-core is not installed (test peer only)")
    return dist.locate_file(relative)


def _load_fla_naive(relative):
    """fla's pure-PyTorch naive module, loaded by path (importing fla itself needs Triton)."""
    pytest.importorskip("einops")
    spec = importlib.util.spec_from_file_location(
        f"fla_peer_{relative.replace('/', '_')}", _fla_file(relative)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_fla_naive_simple_gla():
    """fla computes its naive references in float32: agreement to float32 accuracy."""
    naive = _load_fla_naive("fla/ops/simple_gla/naive.py")
    q, k, v, g, h0 = (x.float() for x in make(t=50, key_gate=False, seed=21))
    ours = chunk_simple_gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    rec = naive.naive_recurrent_simple_gla(
        q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True
    )
    chunked = naive.naive_chunk_simple_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=16, scale=0.3
    )
    for peer_o, peer_s in (rec, chunked):
        torch.testing.assert_close(ours[0], peer_o, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours[1], peer_s, rtol=1e-4, atol=1e-4)


def test_peer_fla_naive_gla():
    naive = _load_fla_naive("fla/ops/gla/naive.py")
    q, k, v, gk, h0 = (x.float() for x in make(t=50, key_gate=True, seed=22))
    # fla's naive_recurrent_gla has no scale argument: it always uses K ** -0.5, our default
    peer_o, peer_s = naive.naive_recurrent_gla(
        q, k, v, gk, initial_state=h0, output_final_state=True
    )
    for op in (chunk_gla, fused_recurrent_gla):
        o, s = op(q, k, v, gk, initial_state=h0, output_final_state=True)
        torch.testing.assert_close(o, peer_o, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s, peer_s, rtol=1e-4, atol=1e-4)


def _fla_signature(relative, function):
    """Positional parameters and defaults of an fla function, read from its source."""
    tree = ast.parse(_fla_file(relative).read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    names = [a.arg for a in node.args.args]
    defaults = [ast.literal_eval(d) for d in node.args.defaults]
    return names, dict(zip(names[len(names) - len(defaults) :], defaults))


@pytest.mark.parametrize(
    ("relative", "op"),
    [
        ("fla/ops/gla/chunk.py", chunk_gla),
        ("fla/ops/gla/fused_recurrent.py", fused_recurrent_gla),
        ("fla/ops/simple_gla/chunk.py", chunk_simple_gla),
        ("fla/ops/simple_gla/fused_recurrent.py", fused_recurrent_simple_gla),
    ],
)
def test_signature_matches_fla(relative, op):
    names, defaults = _fla_signature(relative, op.__name__)
    params = inspect.signature(op).parameters.values()
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == names
    assert {p.name: p.default for p in positional if p.default is not p.empty} == defaults
    keyword_only = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only in ({}, {"chunk_size": 64})  # fla reads chunk_size from **kwargs
