"""DeltaNet / Gated DeltaNet ops against an independent float64 recurrence and fla's naive
references (loaded by file path, so fla's Triton kernels are never imported)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from formerlab.attention.functional import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)

F64 = torch.float64
OPS = ("chunk_delta", "recurrent_delta", "chunk_gated", "recurrent_gated")
CHUNK_OPS = ("chunk_delta", "chunk_gated")
GATED_OPS = ("chunk_gated", "recurrent_gated")


# ----------------------------------------------------------------------------- helpers
def reference(q, k, v, beta, g=None, *, scale=None, initial_state=None, gk=None, gv=None):
    """The (gated) delta rule written as its matrix recurrence, in float64.

    ``S_t = (I - beta_t k_t k_t^T) D_t(S_{t-1}) + beta_t k_t v_t^T``, ``o_t = scale *
    S_t^T q_t``; ``D_t`` scales by ``e^g`` (whole state), ``e^gk`` (rows), ``e^gv``
    (columns). ``beta`` ``[B, T, H]``, or ``[B, T, H, V]``: one transition per column.
    """
    q, k, v, beta = (x.to(F64) for x in (q, k, v, beta))
    g, gk, gv, h0 = (None if x is None else x.to(F64) for x in (g, gk, gv, initial_state))
    batch, seq_len, heads, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if h0 is None else h0
    eye = torch.eye(key_dim, dtype=F64)
    outputs = []
    for t in range(seq_len):
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        if gk is not None:
            state = state * gk[:, t].exp()[..., :, None]
        if gv is not None:
            state = state * gv[:, t].exp()[..., None, :]
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t]
        if b_t.dim() == 2:
            b = b_t[..., None, None]
            transition = eye - b * k_t[..., :, None] * k_t[..., None, :]
            state = transition @ state + b * k_t[..., :, None] * v_t[..., None, :]
        else:  # column j: (I - b_j k k^T) s_j + b_j v_j k
            read = torch.einsum("bhk,bhkv->bhv", k_t, state)
            state = state + k_t[..., :, None] * (b_t * (v_t - read))[..., None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, dim=1), state


def make(B=2, T=11, H=2, K=4, V=3, *, dtype=F64, seed=0, HV=None, grad=False):
    """Random inputs in fla's layout: unit keys, beta in (0.05, 0.95), g = logsigmoid."""
    gen = torch.Generator().manual_seed(seed)
    HV = H if HV is None else HV

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    x = {
        "q": rand(B, T, H, K),
        "k": F.normalize(rand(B, T, H, K), dim=-1),
        "v": rand(B, T, HV, V),
        "beta": 0.05 + 0.9 * torch.rand(B, T, HV, generator=gen, dtype=F64),
        "g": F.logsigmoid(rand(B, T, HV) + 1.0),
        "h0": 0.5 * rand(B, HV, K, V),
    }
    return {n: t.to(dtype).requires_grad_(grad) for n, t in x.items()}


def run(op, x, *, h0=None, chunk_size=4, **kw):
    """Call ``op`` on the inputs ``x`` (fla's argument order for each op)."""
    q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["g"]
    if op in CHUNK_OPS:
        kw["chunk_size"] = chunk_size
    if op == "chunk_delta":
        return chunk_delta_rule(q, k, v, beta, initial_state=h0, **kw)
    if op == "recurrent_delta":
        return fused_recurrent_delta_rule(q, k, v, beta, initial_state=h0, **kw)
    if op == "chunk_gated":
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kw)
    return fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=h0, **kw)


def ref(op, x, *, h0=None, **kw):
    """The reference for ``op`` on ``x`` (no decay for the DeltaNet ops)."""
    g = x["g"] if op in GATED_OPS else None
    return reference(x["q"], x["k"], x["v"], x["beta"], g, initial_state=h0, **kw)


def max_err(a, b):
    return (a.to(F64) - b.to(F64)).abs().max().item()


def grads(out, tensors):
    """Gradients of a fixed random projection of ``out`` (a tuple of tensors)."""
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)).sum() for o in out)
    return torch.autograd.grad(loss, tensors)


def l2norm(x):
    """fla's in-kernel L2 normalisation, ``x / sqrt(|x|^2 + 1e-6)``."""
    return x / torch.sqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True) ** 2 + 1e-6)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors, many ops: on one thread (hand-offs between threads would dominate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fla_naive():
    """fla's naive (pure PyTorch) delta-rule modules, loaded by path; skip without fla."""
    try:
        dist = importlib.metadata.distribution("fla-core")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fla-core is not installed (peer references unavailable)")
    pytest.importorskip("einops")
    modules = {}
    for name in ("delta_rule", "gated_delta_rule"):
        path = dist.locate_file(f"fla/ops/{name}/naive.py")
        if not path.exists():
            pytest.skip(f"fla-core has no {path}")
        spec = importlib.util.spec_from_file_location(f"_fla_naive_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("seq_len", [1, 7, 21])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_recurrence_float64(op, seq_len, with_state):
    x = make(T=seq_len)
    h0 = x["h0"] if with_state else None
    o, s = run(op, x, h0=h0, output_final_state=True)
    o_ref, s_ref = ref(op, x, h0=h0)
    assert o.dtype == F64 and s.dtype == F64 and o.shape == o_ref.shape
    assert max_err(o, o_ref) <= 1e-10
    assert max_err(s, s_ref) <= 1e-10
    assert run(op, x, h0=h0)[1] is None  # output_final_state=False


@pytest.mark.parametrize("op", CHUNK_OPS)
def test_long_sequence_float32(op):
    """T = 2048 in float32 (chunks of 64) stays within 1e-4 of the float64 recurrence."""
    x = make(B=1, T=2048, H=2, K=16, V=16, dtype=torch.float32, seed=3)
    o, s = run(op, x, h0=x["h0"], chunk_size=64, output_final_state=True)
    o_ref, s_ref = ref(op, x, h0=x["h0"])
    assert o.dtype == torch.float32
    assert max_err(o, o_ref) <= 1e-4 * o_ref.abs().max().item()
    assert max_err(s, s_ref) <= 1e-4 * s_ref.abs().max().item()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("l2", [False, True])
def test_gradients_match_recurrence(op, l2):
    """Gradients for every input (T = 13: not a multiple of the chunk), with and without
    the in-kernel L2 normalisation of q and k."""
    x = make(T=13, grad=True)
    if l2:  # raw q, k: the op normalises them, the reference is given them normalised
        x["k"] = (3.0 * x["k"].detach()).requires_grad_()
    o, s = run(op, x, h0=x["h0"], output_final_state=True, use_qk_l2norm_in_kernel=l2)
    ref_x = dict(x, q=l2norm(x["q"]), k=l2norm(x["k"])) if l2 else x
    o_ref, s_ref = ref(op, ref_x, h0=x["h0"])
    assert max_err(o, o_ref) <= 1e-10 and max_err(s, s_ref) <= 1e-10
    names = ["q", "k", "v", "beta", "h0"] + (["g"] if op in GATED_OPS else [])
    leaves = [x[n] for n in names]
    for name, got, want in zip(names, grads((o, s), leaves), grads((o_ref, s_ref), leaves)):
        assert max_err(got, want) <= 1e-10, name


@pytest.mark.parametrize("op", OPS)
def test_packed_sequences_equal_separate_calls(op):
    """cu_seqlens: each packed sequence is computed alone (values, states, gradients)."""
    lengths = [5, 1, 11]
    x = make(B=1, T=sum(lengths), seed=4, grad=True)
    h0 = make(B=len(lengths), seed=5, grad=True)["h0"]
    cu = torch.tensor([0, 5, 6, 17])
    o, s = run(op, x, h0=h0, cu_seqlens=cu, output_final_state=True)
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {n: t[:, a:b] for n, t in x.items() if n != "h0"}
        o_i, s_i = run(op, part, h0=h0[i : i + 1], output_final_state=True)
        outs.append(o_i)
        finals.append(s_i)
    o_sep, s_sep = torch.cat(outs, dim=1), torch.cat(finals, dim=0)
    assert max_err(o, o_sep) <= 1e-12 and max_err(s, s_sep) <= 1e-12
    names = ["q", "k", "v", "beta"] + (["g"] if op in GATED_OPS else [])
    leaves = [x[n] for n in names] + [h0]
    for got, want in zip(grads((o, s), leaves), grads((o_sep, s_sep), leaves)):
        assert max_err(got, want) <= 1e-12
    o_ref, _ = ref(op, {n: t[:, :5] for n, t in x.items() if n != "h0"}, h0=h0[:1])
    assert max_err(o[:, :5], o_ref) <= 1e-10  # and the first sequence is the recurrence


@pytest.mark.parametrize("op", OPS)
def test_streaming_equals_one_call(op):
    """T1 tokens, then T2 tokens from that final state == one call on T1 + T2; the state
    passed in is not modified."""
    x = make(T=13, seed=6)
    first = {n: t[:, :7] for n, t in x.items() if n != "h0"}
    second = {n: t[:, 7:] for n, t in x.items() if n != "h0"}
    h0 = x["h0"].clone()
    o1, s1 = run(op, first, h0=h0, output_final_state=True)
    s1_before = s1.clone()
    o2, s2 = run(op, second, h0=s1, output_final_state=True)
    o, s = run(op, x, h0=h0, output_final_state=True)
    assert max_err(torch.cat([o1, o2], dim=1), o) <= 1e-12 and max_err(s2, s) <= 1e-12
    assert torch.equal(s1, s1_before) and torch.equal(h0, x["h0"])


def test_chunked_prefill_then_recurrent_decode():
    """A chunked prefill followed by one-token recurrent steps equals one chunked call."""
    x = make(T=12, seed=7)
    o_all, s_all = run("chunk_gated", x, h0=x["h0"], output_final_state=True)
    prefix = {n: t[:, :8] for n, t in x.items() if n != "h0"}
    o, state = run("chunk_gated", prefix, h0=x["h0"], output_final_state=True)
    outputs = [o]
    for t in range(8, 12):
        step = {n: v[:, t : t + 1] for n, v in x.items() if n != "h0"}
        o_t, state = run("recurrent_gated", step, h0=state, output_final_state=True)
        outputs.append(o_t)
    assert max_err(torch.cat(outputs, dim=1), o_all) <= 1e-12
    assert max_err(state, s_all) <= 1e-12


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op):
    """Finite differences in float64 for q, k, v, beta, (g) and initial_state; T = 5 spans
    three chunks of 2, the last one padded."""
    x = make(B=1, T=5, H=1, K=3, V=2, seed=8, grad=True)
    names = ["q", "k", "v", "beta"] + (["g"] if op in GATED_OPS else []) + ["h0"]

    def f(*tensors):
        y = dict(x, **dict(zip(names, tensors)))
        return run(op, y, h0=y["h0"], chunk_size=2, output_final_state=True)

    assert torch.autograd.gradcheck(f, [x[n] for n in names])


# ----------------------------------------------------------------------------- peers
def test_peer_fla_naive_delta_rule(fla_naive):
    """fla's delta_rule_chunkwise (float64, [B, H, T, K], scale K^-0.5, no state) and
    delta_rule_recurrence (computes in float32, takes an initial state)."""
    naive = fla_naive["delta_rule"]
    x = make(B=2, T=16, H=2, K=8, V=5, seed=9)
    head_first = [x[n].transpose(1, 2) for n in ("q", "k", "v", "beta")]
    o_fla, s_fla = naive.delta_rule_chunkwise(*head_first, chunk_size=8)
    o, s = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], output_final_state=True)
    assert max_err(o, o_fla.transpose(1, 2)) <= 1e-10 and max_err(s, s_fla) <= 1e-10

    o_fla, s_fla = naive.delta_rule_recurrence(*head_first, initial_state=x["h0"])
    o, s = chunk_delta_rule(
        x["q"], x["k"], x["v"], x["beta"], initial_state=x["h0"], output_final_state=True
    )
    assert max_err(o, o_fla.transpose(1, 2)) <= 1e-5 and max_err(s, s_fla) <= 1e-5


def test_peer_fla_naive_gated_delta_rule(fla_naive):
    """fla's naive gated references compute in float32. Their argument orders differ:
    ``naive_recurrent_gated_delta_rule(q, k, v, beta, g)`` but
    ``naive_chunk_gated_delta_rule(q, k, v, g, beta)`` (as this library's op)."""
    naive = fla_naive["gated_delta_rule"]
    x = make(B=2, T=37, H=2, K=8, V=5, seed=10)
    q, k, v, beta, g, h0 = (x[n] for n in ("q", "k", "v", "beta", "g", "h0"))
    o, s = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=0.7, initial_state=h0, output_final_state=True
    )
    o_rec, s_rec = naive.naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, scale=0.7, initial_state=h0, output_final_state=True
    )
    o_chunk, s_chunk = naive.naive_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=16, scale=0.7, initial_state=h0, output_final_state=True
    )
    for o_fla, s_fla in ((o_rec, s_rec), (o_chunk, s_chunk)):
        assert max_err(o, o_fla) <= 1e-5 and max_err(s, s_fla) <= 1e-5
    # the trap: swapping (g, beta) into the recurrent reference gives something else
    o_swapped, _ = naive.naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.7)
    assert max_err(o_swapped, o_rec) > 1e-2


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("op", OPS)
def test_orthonormal_keys_store_values_exactly(op):
    """beta = 1, no decay, orthonormal keys: the state holds the last value written under
    each key, so S_t^T k_i is that value (0 if never written) and the final state too."""
    key_dim, seq_len = 6, 15
    gen = torch.Generator().manual_seed(11)
    basis = torch.linalg.qr(torch.randn(key_dim, key_dim, generator=gen, dtype=F64))[0].T
    writes = torch.randint(0, key_dim - 1, (seq_len,), generator=gen)  # never key 5
    reads = torch.randint(0, key_dim, (seq_len,), generator=gen)
    v = torch.randn(1, seq_len, 1, 3, generator=gen, dtype=F64)
    x = {
        "q": basis[reads][None, :, None],
        "k": basis[writes][None, :, None],
        "v": v,
        "beta": torch.ones(1, seq_len, 1, dtype=F64),
        "g": torch.zeros(1, seq_len, 1, dtype=F64),
    }
    o, s = run(op, x, scale=1.0, output_final_state=True)
    expected = torch.zeros(seq_len, 3, dtype=F64)
    for t in range(seq_len):
        earlier = [i for i in range(t + 1) if writes[i] == reads[t]]
        if earlier:
            expected[t] = v[0, earlier[-1], 0]
    assert max_err(o[0, :, 0], expected) <= 1e-12
    retrieved = basis @ s[0, 0]  # row i: S^T k_i
    for i in range(key_dim):
        last = [t for t in range(seq_len) if writes[t] == i]
        want = v[0, last[-1], 0] if last else torch.zeros(3, dtype=F64)
        assert max_err(retrieved[i], want) <= 1e-12


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(op, dtype):
    """Half inputs: output in that dtype, state in float32, both as close to the float64
    recurrence (on the same rounded inputs) as the output dtype's rounding allows."""
    x = make(T=20, dtype=dtype, seed=12)
    o, s = run(op, x, h0=x["h0"], chunk_size=8, output_final_state=True)
    o_ref, s_ref = ref(op, x, h0=x["h0"])
    assert o.dtype == dtype and s.dtype == torch.float32
    unit = torch.finfo(dtype).eps  # 2^-7 (bf16), 2^-10 (fp16): twice the rounding error
    assert max_err(o, o_ref) <= unit * o_ref.abs().max().item()
    assert max_err(s, s_ref) <= 1e-5 * s_ref.abs().max().item()


@pytest.mark.parametrize("op", GATED_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_strong_decay_is_stable(op, dtype):
    """g = -20 per token (and -1000, and 0) gives finite values and gradients equal to the
    recurrence: only differences of cumulative log decays are exponentiated."""
    x = make(T=40, seed=13, dtype=dtype)
    pattern = torch.tensor([-20.0, -20.0, -1000.0, 0.0, -20.0], dtype=dtype).repeat(8)
    x["g"] = pattern[None, :, None].expand(2, 40, 2).clone().requires_grad_()
    x["q"].requires_grad_()
    o, s = run(op, x, h0=x["h0"], chunk_size=16, output_final_state=True)
    o_ref, s_ref = ref(op, x, h0=x["h0"])
    tol = 1e-10 if dtype == F64 else 1e-5
    assert max_err(o, o_ref) <= tol and max_err(s, s_ref) <= tol
    dg, dq = grads((o, s), [x["g"], x["q"]])
    dg_ref, dq_ref = grads((o_ref, s_ref), [x["g"], x["q"]])
    assert torch.isfinite(dg).all() and torch.isfinite(dq).all()
    assert max_err(dg, dg_ref) <= tol and max_err(dq, dq_ref) <= tol


def _saved_bytes(fn):
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_backward_keeps_per_chunk_not_per_token_states():
    """The chunked op saves far less than one [K, V] state per token; the recurrence
    (the control, which does keep per-token states) saves more than that."""
    x = make(B=1, T=256, H=1, K=64, V=64, dtype=torch.float32, seed=14, grad=True)
    per_token_states = 256 * 64 * 64 * 4  # bytes of T float32 [K, V] states
    chunked = _saved_bytes(lambda: run("chunk_gated", x, chunk_size=16))
    recurrent = _saved_bytes(lambda: run("recurrent_gated", x))
    assert recurrent > per_token_states
    assert chunked < per_token_states / 2


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("op", GATED_OPS)
def test_beta_sigmoid_options(op):
    x = make(seed=15)
    logits = torch.randn(x["beta"].shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    for neg, factor in ((False, 1.0), (True, 2.0)):
        o, _ = run(op, dict(x, beta=logits), use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg)
        o_ref, _ = ref(op, dict(x, beta=factor * torch.sigmoid(logits)))
        assert max_err(o, o_ref) <= 1e-10


@pytest.mark.parametrize("op", GATED_OPS)
def test_gate_in_kernel(op):
    """use_gate_in_kernel: the log decay is -exp(A_log) * softplus(g + dt_bias)."""
    x = make(seed=16)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(x["g"].shape, generator=gen, dtype=F64)
    a_log, dt_bias = torch.randn(2, 2, generator=gen, dtype=F64)
    o, _ = run(op, dict(x, g=raw), use_gate_in_kernel=True, A_log=a_log, dt_bias=dt_bias)
    o_ref, _ = ref(op, dict(x, g=-a_log.exp() * F.softplus(raw + dt_bias)))
    assert max_err(o, o_ref) <= 1e-10


@pytest.mark.parametrize("op", GATED_OPS)
def test_state_v_first_and_grouped_values(op):
    """state_v_first takes and returns [N, H, V, K]; v with HV = 2H heads reads q/k head
    j // 2 (grouped value attention, as fla)."""
    x = make(H=2, HV=4, seed=17)
    h0_vk = x["h0"].transpose(-1, -2).contiguous()
    o, s = run(op, x, h0=h0_vk, state_v_first=True, output_final_state=True)
    grouped = dict(x, q=x["q"].repeat_interleave(2, dim=2), k=x["k"].repeat_interleave(2, dim=2))
    o_ref, s_ref = ref(op, grouped, h0=x["h0"])
    assert o.shape == (2, 11, 4, 3) and s.shape == (2, 4, 3, 4)
    assert max_err(o, o_ref) <= 1e-10 and max_err(s.transpose(-1, -2), s_ref) <= 1e-10


def test_recurrent_value_decay_and_beta_per_channel():
    """fused_recurrent_gated_delta_rule's gk [.., K], gv [.., V] and beta [.., V]."""
    x = make(seed=18)
    gen = torch.Generator().manual_seed(19)
    gk = F.logsigmoid(torch.randn(2, 11, 2, 4, generator=gen, dtype=F64))
    gv = F.logsigmoid(torch.randn(2, 11, 2, 3, generator=gen, dtype=F64))
    beta = torch.rand(2, 11, 2, 3, generator=gen, dtype=F64)
    o, s = fused_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], gk, gv, beta, output_final_state=True
    )
    o_ref, s_ref = reference(x["q"], x["k"], x["v"], beta, x["g"], gk=gk, gv=gv)
    assert max_err(o, o_ref) <= 1e-10 and max_err(s, s_ref) <= 1e-10
    o, _ = fused_recurrent_delta_rule(x["q"], x["k"], x["v"], beta)
    assert max_err(o, reference(x["q"], x["k"], x["v"], beta)[0]) <= 1e-10
    o, _ = fused_recurrent_delta_rule(x["q"], x["k"], x["v"])  # beta=None means 1
    ones = torch.ones(2, 11, 2, dtype=F64)
    assert max_err(o, reference(x["q"], x["k"], x["v"], ones)[0]) <= 1e-10


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    x = make()
    q, k, v, beta, g, h0 = (x[n] for n in ("q", "k", "v", "beta", "g", "h0"))
    cdr, cgd = chunk_delta_rule, chunk_gated_delta_rule
    fdr, fgd = fused_recurrent_delta_rule, fused_recurrent_gated_delta_rule
    return {
        "q rank 3": (lambda: cdr(q[0], k, v, beta), "q has shape"),
        "k other K": (lambda: cgd(q, k[..., :3], v, g, beta), "k has shape"),
        "v other T": (lambda: cdr(q, k, v[:, :5], beta), "v has shape"),
        "v other H": (lambda: cdr(q, k, v[:, :, :1], beta), "v has shape"),
        "v heads not a multiple": (
            lambda: cgd(q, k, torch.cat([v, v[:, :, :1]], 2), g, beta),
            "v has shape.*multiple of H=2",
        ),
        "beta other T": (lambda: cdr(q, k, v, beta[:, :3]), "beta has shape"),
        "beta rank 2": (lambda: fdr(q, k, v, beta[0]), "beta has shape"),
        "beta per channel in chunk": (
            lambda: cgd(q, k, v, g, beta[..., None].expand(2, 11, 2, 3)),
            "beta has shape.*fused_recurrent",
        ),
        "beta int": (lambda: cdr(q, k, v, beta.long()), "beta must be a floating"),
        "g other H": (lambda: cgd(q, k, v, g[:, :, :1], beta), "g has shape"),
        "g None": (lambda: cgd(q, k, v, None, beta), "g=None"),
        "gk shape": (lambda: fgd(q, k, v, g, g, beta=beta), "gk has shape"),
        "gv shape": (lambda: fgd(q, k, v, gv=g, beta=beta), "gv has shape"),
        "state shape": (lambda: cdr(q, k, v, beta, initial_state=h0[:1]), "initial_state"),
        "state_v_first shape": (
            lambda: cgd(q, k, v, g, beta, initial_state=h0, state_v_first=True),
            "initial_state has shape",
        ),
        "cu_seqlens with B=2": (
            lambda: cdr(q, k, v, beta, cu_seqlens=torch.tensor([0, 4, 11])),
            "cu_seqlens",
        ),
        "cu_seqlens end": (
            lambda: fgd(q[:1], k[:1], v[:1], g[:1], beta=beta[:1], cu_seqlens=torch.tensor([0, 4])),
            "cu_seqlens",
        ),
        "scale": (lambda: cdr(q, k, v, beta, scale=-1.0), "scale"),
        "chunk_size": (lambda: cgd(q, k, v, g, beta, chunk_size=3), "chunk_size"),
        "neg eigval without sigmoid": (
            lambda: cgd(q, k, v, g, beta, allow_neg_eigval=True),
            "allow_neg_eigval",
        ),
        "gate without A_log": (
            lambda: fgd(q, k, v, g, beta=beta, use_gate_in_kernel=True),
            "A_log",
        ),
        "A_log shape": (
            lambda: cgd(q, k, v, g, beta, use_gate_in_kernel=True, A_log=torch.zeros(3)),
            "A_log has shape",
        ),
        "cp_context": (lambda: cgd(q, k, v, g, beta, cp_context=object()), "cp_context"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error_naming_it(case):
    call, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        call()
