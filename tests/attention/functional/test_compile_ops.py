"""torch.compile on the chunked functional ops: compiled forward and backward equal eager.

Each case builds the op's inputs *inside* the compiled function from a fixed input ``x``
and trainable weights, with the differentiable ops a model puts upstream (projections,
``softplus`` / ``logsigmoid`` / ``sigmoid`` gates, transposes that give non-contiguous
views, states computed from ``x``). The traced graph then holds the op's own autograd
Functions next to the ops that consume their gradients: a gradient laid out differently
from what the trace assumed breaks the compiled backward pass, and a ``.view`` that eager
tolerates only for the strides it happens to see breaks the compiled forward pass.

Ground truth is the same function run eagerly: the outputs and the gradients of every
weight agree in float32 (``rtol=1e-4``, and an ``atol`` of ``1e-5`` times the largest
entry for the entries that cancel to near zero). The ``aot_eager`` backend (AOTAutograd's
traced forward and backward, run op by op) covers every case; inductor, whose compiles
take tens of seconds on a CPU, compiles one graph holding GLA and Gated DeltaNet.

An eager group checks the layout the ops promise: the gradient of a contiguous input is
contiguous, for per-token inputs and for a state given in ``[N, H, V, K]`` layout.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from formerlab.attention.functional import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_retention,
    chunk_simple_gla,
    fused_recurrent_gated_delta_rule,
    ssd,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # inductor's own lowering calls a deprecated torch helper
    pytest.mark.filterwarnings("ignore:.*torch._prims_common.check.*:FutureWarning"),
]

BATCH, HEADS, KEY, VALUE, MODEL = 2, 2, 8, 16, 12


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- upstream ops
def proj(x, w):
    """``x [B, T, D] @ w [D, H * E]`` as ``[B, T, H, E]``: contiguous."""
    return (x @ w).unflatten(-1, (HEADS, -1))


def proj_t(x, w):
    """The same projection computed head-major and transposed: a non-contiguous view."""
    heads = torch.einsum("btd,dhe->bhte", x, w.unflatten(-1, (HEADS, -1)))
    return heads.transpose(1, 2)


def gate_t(x, w):
    """``x @ w`` ``[B, T, H]`` computed as ``[B, H, T]`` and transposed: non-contiguous."""
    return torch.einsum("btd,dh->bht", x, w).transpose(1, 2)


def state_from(x, w, rows):
    """A contiguous state ``[B, H, rows, w.shape[1]]`` from the first ``H * rows`` tokens.

    ``softplus`` comes right after the product, the pattern that breaks on a transposed
    gradient: the traced backward pass of ``softplus`` takes the layout of its input where
    eager's takes the layout of the incoming gradient, so the product's traced backward
    pass reshapes with a ``view`` a tensor that eager laid out otherwise.
    """
    tokens = x[:, : HEADS * rows].unflatten(1, (HEADS, rows))
    return F.softplus(tokens @ w) - 1.0


QK = (MODEL, HEADS * KEY)
VV = (MODEL, HEADS * VALUE)
GATE = (MODEL, HEADS)
STATE = (MODEL, VALUE)  # state_from(x, w, KEY): [B, H, K, V]
STATE_V_FIRST = (MODEL, KEY)  # state_from(x, w, VALUE): [B, H, V, K]


@dataclass
class Case:
    """An op fed by upstream ops: ``fn(x, *weights)`` returns the op's output tensors."""

    fn: Callable[..., tuple[torch.Tensor | None, ...]]
    seq_len: int
    weights: tuple[tuple[int, ...], ...]
    batch: int = BATCH


def _simple_gla(x, wq, wk, wv, wg, ws):
    return chunk_simple_gla(
        proj(x, wq),
        proj(x, wk),
        proj_t(x, wv),
        F.logsigmoid(x @ wg),
        initial_state=state_from(x, ws, KEY),
        output_final_state=True,
        chunk_size=32,
    )


def _simple_gla_g_gamma_v_first(x, wq, wk, wv, w_gamma, ws):
    return chunk_simple_gla(
        proj_t(x, wq),
        proj(x, wk),
        proj(x, wv),
        g_gamma=-F.softplus(w_gamma),
        initial_state=state_from(x, ws, VALUE),
        output_final_state=True,
        state_v_first=True,
        chunk_size=32,
    )


def _gla(x, wq, wk, wv, wg, ws):
    g = F.logsigmoid(proj(x, wg))  # a decay per key: [B, T, H, K]
    return chunk_gla(
        proj(x, wq),
        proj_t(x, wk),
        proj(x, wv),
        g,
        initial_state=state_from(x, ws, KEY),
        output_final_state=True,
    )


def _gla_transposed(x, wq, wk, wv, wg):
    g = F.logsigmoid(proj_t(x, wg))  # the gate computed on a non-contiguous view
    return chunk_gla(proj_t(x, wq), proj_t(x, wk), proj_t(x, wv), g)


def _retention(x, wq, wk, wv):
    return chunk_retention(proj_t(x, wq), proj_t(x, wk), proj(x, wv), chunk_size=16)


def _delta_rule(x, wq, wk, wv, wb, ws):
    q, k = (F.normalize(proj(x, w), dim=-1) for w in (wq, wk))
    return chunk_delta_rule(
        q,
        k,
        proj(x, wv),
        torch.sigmoid(x @ wb),
        initial_state=state_from(x, ws, KEY),
        output_final_state=True,
        chunk_size=32,
    )


def _delta_rule_l2norm(x, wq, wk, wv, wb):
    return chunk_delta_rule(
        proj_t(x, wq),
        proj_t(x, wk),
        proj_t(x, wv),
        torch.sigmoid(gate_t(x, wb)),
        use_qk_l2norm_in_kernel=True,
        chunk_size=32,
    )


def _gated_delta_rule(x, wq, wk, wv, wg, wb):
    # the gate of Gated DeltaNet layers: g = -softplus(x W^T), contiguous [B, T, H]
    return chunk_gated_delta_rule(
        proj(x, wq),
        proj(x, wk),
        proj(x, wv),
        -F.softplus(x @ wg),
        torch.sigmoid(x @ wb),
        use_qk_l2norm_in_kernel=True,
        chunk_size=32,
    )


def _gated_delta_rule_options(x, wq, wk, wv, wg, wb, a_log, dt_bias, ws):
    # grouped values (one query/key head, two value heads), the gate and the beta sigmoid
    # computed in the op, a state in [N, HV, V, K] layout
    q, k = ((x @ w).unsqueeze(2) for w in (wq, wk))
    return chunk_gated_delta_rule(
        q,
        k,
        proj_t(x, wv),
        gate_t(x, wg),
        x @ wb,
        initial_state=state_from(x, ws, VALUE),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        state_v_first=True,
        chunk_size=16,
        use_gate_in_kernel=True,
        A_log=a_log,
        dt_bias=dt_bias,
    )


def _gated_delta_rule_packed(x, wq, wk, wv, wg, wb):
    return chunk_gated_delta_rule(
        proj_t(x, wq),
        proj(x, wk),
        proj(x, wv),
        F.logsigmoid(gate_t(x, wg)),
        torch.sigmoid(x @ wb),
        use_qk_l2norm_in_kernel=True,
        output_final_state=True,
        cu_seqlens=torch.tensor([0, 29, x.shape[1]]),
        chunk_size=32,
    )


def _ssd(x, wx, wdt, w_a, wb, wc):
    # Mamba-2's inputs: B and C shared by the heads (one group), dt through softplus
    return (
        ssd(
            proj(x, wx),
            F.softplus(gate_t(x, wdt)),
            -torch.exp(w_a),
            (x @ wb).unsqueeze(2),
            (x @ wc).unsqueeze(2),
            chunk_size=32,
        ),
    )


def _ssd_options(x, wx, wdt, w_a, wb, wc, w_d, wz, ws):
    return ssd(
        proj_t(x, wx),
        x @ wdt,
        -torch.exp(w_a),
        (x @ wb).unsqueeze(2),
        (x @ wc).unsqueeze(2),
        chunk_size=32,
        D=w_d,
        z=proj(x, wz),
        dt_softplus=True,
        initial_states=state_from(x, ws, VALUE),
        return_final_states=True,
    )


def _gla_and_gated_delta_rule(x, wq, wk, wv, wg, w_gate, wb):
    # one graph with both kinds of chunked op, for inductor: GLA's autograd Functions on
    # transposed inputs, Gated DeltaNet under the softplus gate of its layers
    q, k, v = proj_t(x, wq), proj_t(x, wk), proj(x, wv)
    o_gla, _ = chunk_gla(q, k, v, F.logsigmoid(proj_t(x, wg)))
    o_gdn, _ = chunk_gated_delta_rule(
        q,
        k,
        v,
        -F.softplus(x @ w_gate),
        torch.sigmoid(x @ wb),
        use_qk_l2norm_in_kernel=True,
        chunk_size=32,
    )
    return o_gla, o_gdn


SSD = (VV, GATE, (HEADS,), (MODEL, KEY), (MODEL, KEY))

# T = 64 fills whole chunks (no padding), T = 70 pads the last one
CASES = {
    "simple_gla": Case(_simple_gla, 70, (QK, QK, VV, GATE, STATE)),
    "simple_gla_g_gamma_v_first": Case(
        _simple_gla_g_gamma_v_first, 64, (QK, QK, VV, (HEADS,), STATE_V_FIRST)
    ),
    "gla": Case(_gla, 70, (QK, QK, VV, QK, STATE)),
    "gla_transposed_inputs": Case(_gla_transposed, 64, (QK, QK, VV, QK)),
    "retention": Case(_retention, 64, (QK, QK, VV)),
    "delta_rule": Case(_delta_rule, 70, (QK, QK, VV, GATE, STATE)),
    "delta_rule_l2norm": Case(_delta_rule_l2norm, 64, (QK, QK, VV, GATE)),
    "gated_delta_rule": Case(_gated_delta_rule, 64, (QK, QK, VV, GATE, GATE)),
    "gated_delta_rule_options": Case(
        _gated_delta_rule_options,
        70,
        ((MODEL, KEY), (MODEL, KEY), VV, GATE, GATE, (HEADS,), (HEADS,), STATE_V_FIRST),
    ),
    "gated_delta_rule_packed": Case(
        _gated_delta_rule_packed, 70, (QK, QK, VV, GATE, GATE), batch=1
    ),
    "ssd": Case(_ssd, 64, SSD),
    "ssd_options": Case(_ssd_options, 70, (*SSD, (HEADS,), VV, STATE_V_FIRST)),
}


# ----------------------------------------------------------------------------- the check
def inputs_for(case, seed=0):
    """The fixed input ``x`` and the weights (scaled so that projections are O(1))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.seq_len, MODEL, generator=gen)
    weights = [torch.randn(*s, generator=gen) for s in case.weights]
    return x, [w * w.shape[0] ** -0.5 if w.dim() > 1 else w for w in weights]


def forward_backward(fn, x, weights):
    """The outputs and the gradients of every weight for a loss that mixes the outputs."""
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    outs = [o for o in fn(x, *weights) if o is not None]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() + o.square().sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, weights)


def assert_close(got, want):
    assert want.abs().max() > 0  # a zero output or gradient would prove nothing
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def assert_compiled_matches_eager(case, compiled_fn):
    x, weights = inputs_for(case)
    want_outs, want_grads = forward_backward(case.fn, x, weights)
    got_outs, got_grads = forward_backward(compiled_fn, x, weights)
    assert len(got_outs) == len(want_outs)
    for got, want in zip([*got_outs, *got_grads], [*want_outs, *want_grads]):
        assert_close(got, want)


@pytest.mark.parametrize(
    "name", sorted(CASES)
)
def test_aot_eager_forward_and_backward_match_eager(name):
    case = CASES[name]
    assert_compiled_matches_eager(case, torch.compile(case.fn, backend="aot_eager"))


def test_inductor_forward_and_backward_match_eager():
    case = Case(_gla_and_gated_delta_rule, 64, (QK, QK, VV, QK, GATE, GATE))
    assert_compiled_matches_eager(case, torch.compile(case.fn))


# ----------------------------------------------------------------------------- layouts
def _layout_simple_gla(q, k, v, g, beta, h):
    return chunk_simple_gla(
        q, k, v, g, initial_state=h, output_final_state=True, state_v_first=True, chunk_size=16
    )


def _layout_gla(q, k, v, g, beta, h):
    g = g.unsqueeze(-1) * torch.linspace(0.5, 1.5, KEY)  # a decay per key
    return chunk_gla(q, k, v, g, initial_state=h, output_final_state=True, state_v_first=True)


def _layout_retention(q, k, v, g, beta, h):
    return chunk_retention(q, k, v, initial_state=h, output_final_state=True, chunk_size=16)


def _layout_delta_rule(q, k, v, g, beta, h):
    return chunk_delta_rule(
        q,
        k,
        v,
        beta,
        initial_state=h,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        chunk_size=16,
    )


def _layout_gated_delta_rule(q, k, v, g, beta, h):
    return chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state=h,
        output_final_state=True,
        state_v_first=True,
        use_qk_l2norm_in_kernel=True,
        chunk_size=16,
    )


def _layout_recurrent_gated_delta_rule(q, k, v, g, beta, h):
    return fused_recurrent_gated_delta_rule(
        q, k, v, g, beta=beta, initial_state=h, output_final_state=True, state_v_first=True
    )


# op -> (function, the inputs it reads, whether its state is [N, H, V, K])
LAYOUT_OPS = {
    "chunk_simple_gla": (_layout_simple_gla, "qkvgh", True),
    "chunk_gla": (_layout_gla, "qkvgh", True),
    "chunk_retention": (_layout_retention, "qkvh", False),
    "chunk_delta_rule": (_layout_delta_rule, "qkvbh", False),
    "chunk_gated_delta_rule": (_layout_gated_delta_rule, "qkvgbh", True),
    "fused_recurrent_gated_delta_rule": (_layout_recurrent_gated_delta_rule, "qkvgbh", True),
}


@pytest.mark.parametrize("seq_len", [32, 40])
@pytest.mark.parametrize("name", sorted(LAYOUT_OPS))
def test_gradients_of_contiguous_inputs_are_contiguous(name, seq_len):
    """The gradient autograd hands to each contiguous input (q, k, v, the gate, beta, the
    state) is contiguous; a transposed view would reach an upstream ``softplus`` in a
    layout its compiled backward pass does not produce (see :func:`state_from`)."""
    fn, reads, v_first = LAYOUT_OPS[name]
    gen = torch.Generator().manual_seed(0)
    per_token = [(KEY,), (KEY,), (VALUE,), (), ()]
    leaves = [torch.randn(BATCH, seq_len, HEADS, *s, generator=gen) for s in per_token]
    state = (VALUE, KEY) if v_first else (KEY, VALUE)
    leaves.append(torch.randn(BATCH, HEADS, *state, generator=gen))
    inputs = [leaf.requires_grad_(True) * 1.0 for leaf in leaves]  # contiguous, not leaves
    seen = {}
    for letter, x in zip("qkvgbh", inputs):
        if letter in reads:
            x.register_hook(lambda grad, letter=letter: seen.__setitem__(letter, grad))
    q, k, v, g, beta, h = inputs
    outputs = fn(q, k, v, F.logsigmoid(g), torch.sigmoid(beta), h)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    loss.backward()
    assert sorted(seen) == sorted(reads)
    for letter, grad in seen.items():
        assert grad.abs().max() > 0
        assert grad.is_contiguous(), (letter, tuple(grad.shape), grad.stride())
