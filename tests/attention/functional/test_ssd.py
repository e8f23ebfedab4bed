"""Mamba-2's SSD op against a plain float64 recurrence written out below.

The reference runs the state-space model of Dao & Gu (2024), token by token and head by
head, with its own softplus and silu, so it shares no code with the op under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from formerlab.attention.functional import ssd, ssd_recurrent

OPS = [ssd, ssd_recurrent]


def reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False):
    """``(y, final_states)`` of the Mamba-2 SSM, one head and one token at a time, float64."""
    x, dt, A, B, C = (t.detach().double() for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.detach().double()
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    y = torch.zeros(b, T, H, P, dtype=torch.float64)
    final = torch.zeros(b, H, P, N, dtype=torch.float64)
    for i in range(b):
        for h in range(H):
            g = h // (H // G)
            S = torch.zeros(P, N, dtype=torch.float64)
            if initial_states is not None:
                S = initial_states[i, h].detach().double().clone()
            for t in range(T):
                step = float(dt[i, t, h])
                S = math.exp(step * float(A[h])) * S + step * torch.outer(x[i, t, h], B[i, t, g])
                y[i, t, h] = S @ C[i, t, g]
            final[i, h] = S
    if D is not None:
        D = D.detach().double()
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        z = z.detach().double()
        y = y * z / (1 + torch.exp(-z))
    return y, final


def make_inputs(b=2, T=13, H=4, P=3, G=2, N=5, dtype=torch.float64, seed=0, options=()):
    """Random inputs in mamba's ranges; ``options`` names the optional arguments to add."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    softplus = "dt_softplus" in options
    raw_dt = randn(b, T, H) - 1 if softplus else torch.rand(b, T, H, generator=gen) * 0.5 + 0.05
    args = {
        "x": randn(b, T, H, P),
        "dt": raw_dt.double(),
        "A": -torch.exp(torch.rand(H, generator=gen, dtype=torch.float64)),
        "B": randn(b, T, G, N),
        "C": randn(b, T, G, N),
    }
    extra = {
        "D_H": ("D", lambda: randn(H)),
        "D_HP": ("D", lambda: randn(H, P)),
        "z": ("z", lambda: randn(b, T, H, P)),
        "dt_bias": ("dt_bias", lambda: randn(H) * 0.5),
        "initial_states": ("initial_states", lambda: randn(b, H, P, N)),
    }
    for option in options:
        if option in extra:
            name, draw = extra[option]
            args[name] = draw()
    args = {k: v.to(dtype) for k, v in args.items()}
    if softplus:
        args["dt_softplus"] = True
    return args


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


OPTIONS = [
    (),
    ("D_H",),
    ("D_HP",),
    ("z",),
    ("dt_bias", "dt_softplus"),
    ("dt_softplus",),
    ("initial_states",),
    ("D_HP", "z", "dt_bias", "dt_softplus", "initial_states"),
]


# chunk sizes 1, 4 (does not divide T = 13) and 32 (> T); the recurrence has no chunks
OP_CHUNKS = [(ssd, 1), (ssd, 4), (ssd, 32), (ssd_recurrent, 4)]


@pytest.mark.parametrize(("op", "chunk_size"), OP_CHUNKS, ids=["ssd-1", "ssd-4", "ssd-32", "rec"])
@pytest.mark.parametrize(
    ("options", "G"),
    # every option with 1 < G < H (H = 4); G = 1 and G = H with all options at once
    [(o, 2) for o in OPTIONS] + [(OPTIONS[-1], 1), (OPTIONS[-1], 4)],
    ids=[f"{'+'.join(o) or 'plain'}-G{g}" for o, g in [(o, 2) for o in OPTIONS]]
    + [f"all-G{g}" for g in (1, 4)],
)
def test_matches_recurrence_float64(op, chunk_size, options, G):
    args = make_inputs(G=G, options=options)
    y, final = op(**args, chunk_size=chunk_size, return_final_states=True)
    y_ref, final_ref = reference(**args)
    assert y.dtype == final.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-10)


def test_long_sequence_float64_and_float32():
    options = ("D_HP", "z", "dt_bias", "dt_softplus", "initial_states")
    args = make_inputs(b=1, T=2048, H=2, P=4, G=1, N=8, options=options, seed=1)
    y_ref, final_ref = reference(**args)
    y, final = ssd(**args, chunk_size=64, return_final_states=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-10)
    args32 = {k: v.float() if torch.is_tensor(v) else v for k, v in args.items()}
    y32, final32 = ssd(**args32, chunk_size=64, return_final_states=True)
    assert y32.dtype == final32.dtype == torch.float32
    assert rel_err(y32, y_ref) <= 1e-4
    assert rel_err(final32, final_ref) <= 1e-4


@pytest.mark.parametrize("first", OPS)
@pytest.mark.parametrize("second", OPS)
def test_two_calls_with_states_equal_one_call(first, second):
    args = make_inputs(T=11, options=("D_H", "z", "dt_bias", "dt_softplus", "initial_states"))
    y_all, final_all = ssd(**args, chunk_size=4, return_final_states=True)
    per_token = {"x", "dt", "B", "C", "z"}
    head = {k: v[:, :6] if k in per_token else v for k, v in args.items()}
    tail = {k: v[:, 6:] if k in per_token else v for k, v in args.items()}
    state_before = head["initial_states"].clone()
    y1, mid = first(**head, chunk_size=4, return_final_states=True)
    assert torch.equal(head["initial_states"], state_before)  # a state is a value
    tail["initial_states"] = mid
    y2, final = second(**tail, chunk_size=4, return_final_states=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_all, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, final_all, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_empty_sequence_returns_the_initial_state(op):
    args = make_inputs(T=0, options=("initial_states",))
    y, final = op(**args, return_final_states=True)
    assert y.shape == args["x"].shape
    torch.testing.assert_close(final, args["initial_states"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("G", "D_shape"), [(1, "D_H"), (2, "D_HP")], ids=["G=1,D[H]", "G=2,D[H,P]"]
)
def test_gradcheck_float64(G, D_shape):
    options = (D_shape, "z", "dt_bias", "dt_softplus", "initial_states")
    args = make_inputs(b=1, T=5, H=2, P=2, G=G, N=3, options=options, seed=2)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    tensors = [args[n].clone().requires_grad_() for n in names]

    def f(*ts):
        return ssd(**dict(zip(names, ts)), chunk_size=2, dt_softplus=True, return_final_states=True)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradients_match_the_recurrence():
    options = ("D_HP", "z", "dt_bias", "dt_softplus", "initial_states")
    args = make_inputs(T=19, G=2, options=options, seed=3)
    names = [k for k, v in args.items() if torch.is_tensor(v)]
    grads = []
    for op in OPS:
        leaves = {k: args[k].clone().requires_grad_() for k in names}
        y, final = op(**{**args, **leaves}, chunk_size=4, return_final_states=True)
        (y.sin().sum() + final.cos().sum()).backward()
        grads.append([leaves[k].grad for k in names])
    for name, g_chunk, g_rec in zip(names, *grads):
        torch.testing.assert_close(g_chunk, g_rec, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("op", OPS)
def test_no_decay_is_a_cumulative_sum(op):
    # A = 0, B = C = 1, one head, P = N = 1: h_t = h_{t-1} + dt_t x_t, y_t = h_t
    T = 10
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, T, 1, 1, generator=gen, dtype=torch.float64)
    dt = torch.rand(1, T, 1, generator=gen, dtype=torch.float64)
    ones = torch.ones(1, T, 1, 1, dtype=torch.float64)
    y = op(x, dt, torch.zeros(1, dtype=torch.float64), ones, ones, chunk_size=3)
    want = torch.cumsum(dt[..., None] * x, dim=1)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strong_decay_is_stable(dtype):
    # dt * A ~ -50 per token: exp(-50 * 64) underflows over a chunk of 64 and the reversed
    # segment sums reach +3000 (exp = inf if not masked first); nothing may be inf or nan
    args = make_inputs(b=1, T=150, H=2, P=3, G=1, N=4, options=("initial_states",), seed=5)
    args["dt"] = 1 + 0.2 * torch.rand(args["dt"].shape, dtype=torch.float64)  # not round
    args["A"] = torch.tensor([-50.0, -2.0], dtype=torch.float64)
    y_ref, final_ref = reference(**args)
    leaves = {k: v.to(dtype).requires_grad_() for k, v in args.items()}
    y, final = ssd(**leaves, chunk_size=64, return_final_states=True)
    (y.sum() + final.sum()).backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(y[:, :, 0], y_ref[:, :, 0]) <= tol  # the strongly decaying head
    assert rel_err(y, y_ref) <= tol
    assert rel_err(final, final_ref) <= tol
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())


@pytest.mark.parametrize("op", OPS)
def test_decay_underflow_keeps_only_the_current_token(op):
    # exp(-1e4) == 0 even in float64: y_t = dt_t (B_t . C_t) x_t exactly, gradients finite
    args = make_inputs(b=1, T=9, H=2, P=3, G=1, N=4, dtype=torch.float32, seed=6)
    args["A"] = torch.full((2,), -1e4)
    args["dt"] = torch.ones_like(args["dt"])
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    y = op(**leaves, chunk_size=4)
    y.sum().backward()
    bc = (args["B"] * args["C"]).sum(-1)  # [b, T, 1]
    torch.testing.assert_close(y, bc[..., None] * args["x"], rtol=1e-6, atol=1e-6)
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs(op, dtype, tol):
    options = ("D_H", "z", "dt_bias", "dt_softplus", "initial_states")
    args = make_inputs(T=21, options=options, dtype=dtype, seed=7)
    y, final = op(**args, chunk_size=8, return_final_states=True)
    assert y.dtype == dtype
    assert final.dtype == torch.float32  # states keep float32 between streaming calls
    y_ref, final_ref = reference(**args)  # on the same rounded inputs
    assert rel_err(y, y_ref) <= tol
    assert rel_err(final, final_ref) <= 1e-5


def _bad(name, value):
    return lambda a: {**a, name: value(a)}


BAD = [
    (
        "x",
        _bad("x", lambda a: a["x"][0]),
        r"x has shape \(13, 4, 3\) \(3-D\), expected \[b, T, H, P\] \(4-D\)",
    ),
    ("x-int", _bad("x", lambda a: a["x"].long()), r"x must be a floating-point tensor"),
    ("dt-rank", _bad("dt", lambda a: a["dt"][..., None]), r"dt has shape .*\[b, T, H\]"),
    ("dt-T", _bad("dt", lambda a: a["dt"][:, 1:]), r"dt has shape \(2, 12, 4\).*\(2, 13, 4\)"),
    ("A", _bad("A", lambda a: a["A"][:3]), r"A has shape \(3,\), expected \[H\] = \(4,\)"),
    ("B-rank", _bad("B", lambda a: a["B"][0]), r"B has shape .*expected \[b, T, G, N\] \(4-D\)"),
    ("B-batch", _bad("B", lambda a: a["B"][:1]), r"B has shape \(1, 13, 2, 5\)"),
    ("C-N", _bad("C", lambda a: a["C"][..., :4]), r"C has shape .*\(2, 13, 2, 5\)"),
    ("C-G", _bad("C", lambda a: a["C"][:, :, :1]), r"C has shape .*the shape of B"),
    (
        "G-divides-H",
        lambda a: {
            **a,
            "B": a["B"][:, :, :1].expand(-1, -1, 3, -1),
            "C": a["C"][:, :, :1].expand(-1, -1, 3, -1),
        },
        r"B has shape .*G=3 groups for H=4 heads",
    ),
    (
        "D-P",
        _bad("D", lambda a: torch.ones(4, 2)),
        r"D has shape \(4, 2\), expected \[H\].*\[H, P\] = \(4, 3\)",
    ),
    ("D-rank", _bad("D", lambda a: torch.ones(4, 3, 1)), r"D has shape .*\[H\] or \[H, P\]"),
    ("z", _bad("z", lambda a: a["x"][:, :, :, :2]), r"z has shape .*\[b, T, H, P\]"),
    ("dt_bias", _bad("dt_bias", lambda a: torch.ones(4, 1)), r"dt_bias has shape .*\[H\] = \(4,\)"),
    (
        "initial_states",
        _bad("initial_states", lambda a: torch.zeros(2, 4, 5, 3)),
        r"initial_states has shape \(2, 4, 5, 3\), expected \[b, H, P, N\] = \(2, 4, 3, 5\)",
    ),
    ("chunk_size-0", _bad("chunk_size", lambda a: 0), r"chunk_size=0"),
    ("chunk_size-float", _bad("chunk_size", lambda a: 2.5), r"chunk_size=2.5"),
    ("chunk_size-bool", _bad("chunk_size", lambda a: True), r"chunk_size=True"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("case", "corrupt", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_value_error_naming_it(op, case, corrupt, message):
    args = corrupt(make_inputs(dtype=torch.float64))
    with pytest.raises(ValueError, match=message):
        op(**args)
