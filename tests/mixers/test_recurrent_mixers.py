"""The recurrent token mixers (retention, gla, deltanet, gated_deltanet, mamba2).

Ground truth for each: a plain token-by-token reference written here from the layer's
published equations, using the mixer's own parameters, a hand-written short convolution
and the ``fused_recurrent_*`` / ``ssd_recurrent`` op fed one token at a time (float64,
<= 1e-10). Also: padding, gradients to every parameter, dtypes, option errors, the
causal-only contract, hand-counted parameters (and ``formerlab params``), streaming state
sizes, and training inside ``DecoderLM`` / ``EncoderClassifier``. Streaming = parallel,
causality, prefix consistency, masked steps, states as values and batched generation are
checked for every causal mixer by the registry-wide tests.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from formerlab import mixers
from formerlab.attention.functional import (
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
    fused_recurrent_retention,
    ssd_recurrent,
)
from formerlab.cli import app
from formerlab.mixers.params import count_parameters, parameter_table
from formerlab.models import DecoderLM, EncoderClassifier

F64 = torch.float64
EPS = 1e-5  # the mixers' RMS / group norm eps
NAMES = ["retention", "gla", "deltanet", "gated_deltanet", "mamba2"]


def build(name, dim=16, heads=2, seed=0, dtype=F64, **options):
    torch.manual_seed(seed)
    mixer = mixers.build(name, dim=dim, heads=heads, **options).to(dtype)
    with torch.no_grad():  # move the norms off their all-ones start: a wrong weight shows
        for param_name, p in mixer.named_parameters():
            if "norm" in param_name:
                p.add_(0.3 * torch.randn_like(p))
    return mixer


# ----------------------------------------------------------------------------- references
def linear(x, layer):
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def short_conv(x, weight, bias=None):
    """out_t = silu(bias + sum_j weight[:, j] * x_{t-K+1+j}), zeros before the start."""
    size = weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(size):
            s = t - size + 1 + j
            if s >= 0:
                out[:, t] += weight[:, j] * x[:, s]
    return F.silu(out if bias is None else out + bias)


def rms(x, weight, group=None):
    """RMSNorm over groups of ``group`` channels of the last axis (all if None)."""
    shape = x.shape
    group = group or shape[-1]
    g = x.reshape(*shape[:-1], -1, group)
    return (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + EPS)).reshape(shape) * weight


def rotate(x, positions, base=10000.0):
    """Rotary embedding of x (B, T, H, D): pairs (x_2i, x_2i+1) turned by t * base^(-2i/D)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    angle = positions[:, None] * theta[None, :]  # (T, D/2)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def token_by_token(op, per_token, **kwargs):
    """Run ``op`` one token at a time from a zero state; ``per_token`` are [B, T, ...]."""
    state, outs = None, []
    for t in range(per_token[0].shape[1]):
        o, state = op(
            *(p[:, t : t + 1] for p in per_token),
            initial_state=state,
            output_final_state=True,
            **kwargs,
        )
        outs.append(o)
    return torch.cat(outs, dim=1)


def heads(x, h):
    return x.reshape(*x.shape[:2], h, -1)


def projected_qkv(m, x):
    """q, k, v per head, through the optional short convolution (one over q, k, v)."""
    parts = [linear(x, m.q), linear(x, m.k), linear(x, m.v)]
    if m.conv is not None:
        sizes = [p.shape[-1] for p in parts]
        parts = short_conv(torch.cat(parts, dim=-1), m.conv.weight).split(sizes, dim=-1)
    return tuple(heads(p, m.heads) for p in parts)


def retention_reference(m, x):
    b, t, _ = x.shape
    q, k, v = projected_qkv(m, x)
    if m.rope:
        pos = torch.arange(t, dtype=F64)
        q, k = rotate(q, pos), rotate(k, pos)
    o = token_by_token(fused_recurrent_retention, [q, k, v])  # gamma_h = 1 - 2^(-5-h)
    mean = o.mean(-1, keepdim=True)
    var = (o - mean).pow(2).mean(-1, keepdim=True)
    o = ((o - mean) / torch.sqrt(var + EPS)).reshape(b, t, -1) * m.norm.weight + m.norm.bias
    return linear(F.silu(linear(x, m.gate)) * o, m.out)


def gla_reference(m, x):
    b, t, _ = x.shape
    q, k, v = projected_qkv(m, x)
    gk = heads(F.logsigmoid(linear(linear(x, m.decay_down), m.decay_up)) / 16.0, m.heads)

    def op(q, k, v, gk, **kw):
        return fused_recurrent_gla(q, k, v, gk=gk, **kw)

    o = rms(token_by_token(op, [q, k, v, gk]), m.norm_weight).reshape(b, t, -1)
    return linear(F.silu(linear(x, m.gate)) * o, m.out)


def delta_inputs(m, x):
    qkv = short_conv(linear(x, m.qkv), m.conv.weight)
    q, k, v = qkv.split([m.key_dim, m.key_dim, m.value_dim], -1)
    return heads(q, m.heads), heads(k, m.heads), heads(v, m.heads)


def deltanet_reference(m, x):
    b, t, _ = x.shape
    q, k, v = delta_inputs(m, x)
    beta = torch.sigmoid(linear(x, m.beta))
    o = token_by_token(fused_recurrent_delta_rule, [q, k, v, beta], use_qk_l2norm_in_kernel=True)
    return linear(rms(o, m.norm_weight).reshape(b, t, -1), m.out)


def gated_deltanet_reference(m, x):
    b, t, _ = x.shape
    q, k, v = delta_inputs(m, x)

    def op(q, k, v, raw_gate, beta_logits, **kw):  # the op's own gate and beta transforms
        return fused_recurrent_gated_delta_rule(
            q,
            k,
            v,
            g=raw_gate,
            beta=beta_logits,
            use_gate_in_kernel=True,
            A_log=m.A_log,
            dt_bias=m.dt_bias,
            use_beta_sigmoid_in_kernel=True,
            use_qk_l2norm_in_kernel=True,
            **kw,
        )

    o = token_by_token(op, [q, k, v, linear(x, m.alpha), linear(x, m.beta)])
    gate = heads(F.silu(linear(x, m.gate)), m.heads)
    return linear((rms(o, m.norm_weight) * gate).reshape(b, t, -1), m.out)


def mamba2_reference(m, x):
    b, t, _ = x.shape
    di, gn, h = m.inner, m.ngroups * m.d_state, m.heads
    z, xbc, dt = linear(x, m.in_proj).split([di, di + 2 * gn, h], -1)
    xs, B, C = short_conv(xbc, m.conv.weight, m.conv.bias).split([di, gn, gn], -1)
    state, ys = None, []
    for i in range(t):
        y, state = ssd_recurrent(
            heads(xs[:, i : i + 1], h),
            dt[:, i : i + 1],
            -torch.exp(m.A_log),
            heads(B[:, i : i + 1], m.ngroups),
            heads(C[:, i : i + 1], m.ngroups),
            D=m.D,
            dt_bias=m.dt_bias,
            dt_softplus=True,
            initial_states=state,
            return_final_states=True,
        )
        ys.append(y)
    y = torch.cat(ys, 1).reshape(b, t, di) * F.silu(z)
    return linear(rms(y, m.norm_weight, group=di // m.ngroups), m.out)


REFERENCES = {
    "retention": retention_reference,
    "gla": gla_reference,
    "deltanet": deltanet_reference,
    "gated_deltanet": gated_deltanet_reference,
    "mamba2": mamba2_reference,
}

# (mixer, options): the defaults, and a variant that takes other paths
REFERENCE_CASES = [
    ("retention", {"chunk_size": 16}),
    ("retention", {"rope": False, "expand_v": 1.0}),
    ("retention", {"conv": 4}),
    ("gla", {}),
    ("gla", {"expand_k": 1.0, "gate_rank": 4}),
    ("gla", {"conv": 3}),
    ("deltanet", {"chunk_size": 16}),
    ("deltanet", {"conv": 2, "expand_v": 2.0}),
    ("gated_deltanet", {"chunk_size": 16}),
    ("gated_deltanet", {"conv": 3, "expand_k": 0.5}),
    ("mamba2", {"chunk_size": 16}),
    ("mamba2", {"ngroups": 2, "d_state": 8, "head_dim": 4, "conv": 3}),
]
REFERENCE_IDS = [
    f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in REFERENCE_CASES
]


@pytest.mark.parametrize(("name", "options"), REFERENCE_CASES, ids=REFERENCE_IDS)
def test_parallel_output_equals_the_token_by_token_reference(name, options):
    mixer = build(name, heads=4 if "ngroups" in options else 2, **options)
    x = torch.randn(2, 70, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        got = mixer(x, causal=True)
        want = REFERENCES[name](mixer, x)
    assert got.dtype == F64
    assert (got - want).abs().max() <= 1e-10
    assert want.abs().max() > 0.1  # not a trivially small output


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("name", NAMES)
def test_padded_tokens_output_zero_and_leave_every_state_unchanged(name):
    mixer = build(name)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 16, generator=g, dtype=F64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 5:7] = False  # a gap inside the row
    with torch.no_grad():
        out, state = mixer.step(x, mixer.init_state(2, dtype=F64), attention_mask=mask)
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
        # junk in the padded slots changes nothing, outputs and state alike
        junk = torch.where(mask[..., None], x, 1e3 * torch.randn(2, 9, 16, generator=g, dtype=F64))
        out2, state2 = mixer.step(junk, mixer.init_state(2, dtype=F64), attention_mask=mask)
        assert torch.equal(out, out2) and torch.equal(state.memory, state2.memory)
        # row 0's state is the state of its real tokens alone
        _, alone = mixer.step(x[:1, 4:], mixer.init_state(1, dtype=F64))
    assert (state.memory[:1] - alone.memory).abs().max() <= 1e-12
    if state.window is not None:
        assert (state.window[:1] - alone.window).abs().max() <= 1e-12


# ----------------------------------------------------------------------------- autograd, dtypes
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter_and_the_input(name):
    mixer = build(name, dtype=torch.float32)
    x = torch.randn(2, 21, 16, requires_grad=True)
    mixer(x, causal=True).mul(torch.randn(2, 21, 16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for param_name, p in mixer.named_parameters():
        assert p.grad is not None, param_name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_bfloat16_inputs_return_their_dtype_with_a_float32_state(name):
    x = torch.randn(2, 40, 16)
    ref = build(name, dtype=torch.float32)
    out32 = ref(x, causal=True)
    assert out32.dtype == torch.float32
    half = build(name, dtype=torch.bfloat16)
    out16 = half(x.bfloat16(), causal=True)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    # bf16 weights and inputs, float32 recurrence: within a few bf16 roundings
    assert (out16.float() - out32).abs().max() <= 5e-2 * out32.abs().max()
    state = half.init_state(2, dtype=torch.bfloat16)
    step, state = half.step(x[:, :5].bfloat16(), state)
    assert step.dtype == torch.bfloat16 and state.memory.dtype == torch.float32


# ----------------------------------------------------------------------------- contracts
@pytest.mark.parametrize("name", NAMES)
def test_causal_false_is_refused_naming_the_mixer(name):
    mixer = build(name)
    assert mixer.supports_causal and mixer.supports_streaming
    assert mixers.MIXERS.entry(name).causal and mixers.MIXERS.entry(name).extra["causal_only"]
    with pytest.raises(ValueError, match=rf"token mixer '{name}' .*is causal-only.*causal=True"):
        mixer(torch.zeros(1, 3, 16, dtype=F64))


BAD_OPTIONS = [
    ("retention", {"heads": 0}, r"heads=0"),
    ("retention", {"expand_k": 0}, r"expand_k=0 is not allowed"),
    ("retention", {"expand_v": 0.3}, r"expand_v=0.3 is not allowed with dim=16, heads=2"),
    ("retention", {"expand_k": 0.375}, r"rope=True .* even"),  # 3 channels per head
    ("retention", {"chunk_size": 3}, r"chunk_size=3 .* power of two"),
    ("retention", {"rope": "yes"}, r"rope='yes'"),
    ("gla", {"gate_rank": 0}, r"gate_rank=0"),
    ("gla", {"gate_norm": -1.0}, r"gate_norm=-1.0"),
    ("gla", {"expand_k": "half"}, r"expand_k='half'"),
    ("gla", {"conv": 1}, r"conv=1 .* integer >= 2"),
    ("retention", {"conv": -4}, r"conv=-4"),
    ("deltanet", {"conv": 0}, r"conv=0"),
    ("deltanet", {"chunk_size": 0}, r"chunk_size=0"),
    ("gated_deltanet", {"expand_v": 3.3}, r"expand_v=3.3"),
    ("gated_deltanet", {"conv": 2.5}, r"conv=2.5"),
    ("mamba2", {"ngroups": 3, "heads": 4}, r"ngroups=3 .* divisor of heads"),
    ("mamba2", {"d_state": 0}, r"d_state=0"),
    ("mamba2", {"head_dim": 0}, r"head_dim=0"),
    ("mamba2", {"expand": 2, "head_dim": 5}, r"expand=2 and head_dim=5 disagree"),
    ("mamba2", {"expand": 0.1}, r"expand=0.1"),
    ("mamba2", {"chunk_size": 0}, r"chunk_size=0"),
    ("mamba2", {"dstate": 16}, r"unknown option\(s\) \['dstate'\] for token mixer 'mamba2'"),
]


@pytest.mark.parametrize(
    ("name", "options", "match"),
    BAD_OPTIONS,
    ids=[f"{n}-{next(iter(o))}" for n, o, _ in BAD_OPTIONS],
)
def test_bad_options_raise_naming_the_option(name, options, match):
    options = {"dim": 16, "heads": 2, **options}
    with pytest.raises(ValueError, match=match):
        mixers.build(name, **options)


def test_mamba2_head_dim_sets_the_inner_width():
    m = mixers.build("mamba2", dim=16, heads=4, head_dim=3)
    assert (m.inner, m.head_dim) == (12, 3)
    m = mixers.build("mamba2", dim=16, heads=4, expand=1.5, head_dim=6)  # they agree
    assert (m.inner, m.head_dim) == (24, 6)
    m = mixers.build("mamba2", dim=16, heads=4)
    assert (m.inner, m.head_dim) == (32, 8)


@pytest.mark.parametrize("name", NAMES)
def test_a_state_that_does_not_fit_is_refused(name):
    mixer = build(name)
    x = torch.zeros(2, 1, 16, dtype=F64)
    with pytest.raises(ValueError, match=r"state does not fit .* a batch of 2"):
        mixer.step(x, mixer.init_state(3, dtype=F64))
    with pytest.raises(ValueError, match="state must be a RecurrentState"):
        mixer.step(x, mixers.build("pooling", dim=16).init_state(2, dtype=F64))


# ----------------------------------------------------------------------------- sizes
def hand_count(name, dim, heads, **o):
    """Parameters of each layer design, from its equations (see the class docstrings)."""
    if name == "mamba2":
        inner = heads * o["head_dim"] if "head_dim" in o else int(dim * o.get("expand", 2))
        bc = o.get("ngroups", 1) * o.get("d_state", 16)
        conv_dim = inner + 2 * bc
        return (
            dim * (inner + conv_dim + heads)  # in_proj -> z, x, B, C, dt
            + conv_dim * (o.get("conv", 4) + 1)  # taps + bias
            + 3 * heads
            + inner
            + inner * dim
        )  # A_log, dt_bias, D; norm; out
    dk = int(dim * o.get("expand_k", {"gla": 0.5}.get(name, 1.0)))
    dv = int(dim * o.get("expand_v", {"retention": 2.0, "gated_deltanet": 2.0}.get(name, 1.0)))
    taps = (2 * dk + dv) * o.get("conv", 0)  # the optional convolution over q, k, v
    if name == "retention":
        # q, k; v, gate; group norm; out
        return 2 * dim * dk + 2 * dim * dv + 2 * dv + dv * dim + taps
    if name == "gla":
        r = o.get("gate_rank", 16)
        return 2 * dim * dk + 2 * dim * dv + dim * r + r * dk + dk + dv // heads + dv * dim + taps
    conv = o.get("conv", 4)
    count = dim * (2 * dk + dv) + (2 * dk + dv) * conv + dim * heads + dv // heads + dv * dim
    if name == "gated_deltanet":
        count += dim * heads + 2 * heads + dim * dv  # W_alpha, A_log, dt_bias, output gate
    return count


SIZE_CASES = [
    ("retention", 16, 2, {}),
    ("gla", 16, 2, {}),
    ("deltanet", 16, 2, {}),
    ("gated_deltanet", 16, 2, {}),
    ("mamba2", 16, 2, {}),
    ("gla", 24, 3, {"gate_rank": 5, "expand_v": 2.0}),
    ("gla", 16, 2, {"conv": 4}),
    ("retention", 16, 2, {"conv": 3}),
    ("gated_deltanet", 12, 3, {"expand_k": 0.5, "conv": 2}),
    ("mamba2", 16, 4, {"ngroups": 2, "d_state": 8, "head_dim": 3, "conv": 2}),
]


@pytest.mark.parametrize(("name", "dim", "heads", "options"), SIZE_CASES)
def test_parameter_counts_equal_the_layer_design(name, dim, heads, options):
    assert count_parameters(mixers.build(name, dim=dim, heads=heads, **options)) == hand_count(
        name, dim, heads, **options
    )


def test_params_table_and_command_list_them_next_to_attention():
    rows = {r.mixer: r for r in parameter_table(32, 4)}
    attention = rows["attention"].params
    for name in NAMES:
        assert rows[name].params == hand_count(name, 32, 4)
        assert rows[name].ratio == rows[name].params / attention
    result = CliRunner().invoke(
        app,
        [
            "params",
            "--set",
            "model.dim=32",
            "--set",
            "model.heads=4",
            "--set",
            "model.mixer=mamba2",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for name in NAMES:
        line = next(line for line in result.output.splitlines() if line.startswith(name))
        assert f"{hand_count(name, 32, 4):,}" in line, line
    assert "mamba2 (configured)" in result.output


def state_bytes(name, dim, heads, **o):
    """The streaming state per sequence and layer in float32, as docs/how-to/choose-a-mechanism
    writes it."""
    if name == "mamba2":
        inner = int(dim * o.get("expand", 2))
        return 4 * (inner * o.get("d_state", 16) + (o.get("conv", 4) - 1) * (inner + 2 * 16))
    dk = int(dim * o.get("expand_k", {"gla": 0.5}.get(name, 1.0)))
    dv = int(dim * o.get("expand_v", {"retention": 2.0, "gated_deltanet": 2.0}.get(name, 1.0)))
    conv = o.get("conv", 4 if "deltanet" in name else 0)
    window = max(conv - 1, 0) * (2 * dk + dv)
    return 4 * (dk * dv // heads + window)


@pytest.mark.parametrize("name", NAMES)
def test_streaming_state_size_is_the_documented_formula_and_constant(name):
    mixer = mixers.build(name, dim=32, heads=4)
    state = mixer.init_state(1)

    def size(s):
        return sum(t.numel() * t.element_size() for t in (s.memory, s.window) if t is not None)

    assert size(state) == state_bytes(name, 32, 4)
    with torch.no_grad():
        _, state = mixer.step(torch.randn(1, 50, 32), state)
        _, state = mixer.step(torch.randn(1, 1, 32), state)
    assert size(state) == state_bytes(name, 32, 4)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", NAMES)
def test_trains_as_the_mixer_of_a_decoder_from_a_config(name, tmp_path):
    from formerlab.train import load_config, train

    overrides = [
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        f"model.mixer={name}",
        "task.name=sort",
        "task.options={length: 4, num_values: 4}",
        "train.steps=30",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.warmup=2",
        "train.eval_every=30",
        "train.eval_batches=1",
        "train.log_every=1",
        "sample.tokens=0",
        f"runs_dir={tmp_path / 'runs'}",
        "tracking=none",
    ]
    result = train(load_config(None, overrides), progress=False)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    assert result.metrics["accuracy"] > 0.4  # a uniform guess scores 0.25


@pytest.mark.parametrize("name", NAMES)
def test_classifiers_run_the_mixer_causally_with_padding(name):
    torch.manual_seed(0)
    ids = torch.randint(1, 9, (3, 10))
    mask = torch.arange(10)[None, :] >= torch.tensor([0, 3, 6])[:, None]  # left padding
    enc = EncoderClassifier(9, 2, dim=16, depth=1, heads=2, max_len=12, mixer=name, causal=True)
    enc = enc.double().eval()
    logits = enc(ids, attention_mask=mask)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    # padded token ids do not matter
    other = torch.where(mask, ids, (ids + 3) % 9)
    assert (enc(other, attention_mask=mask) - logits).abs().max() <= 1e-12
    bidirectional = EncoderClassifier(9, 2, dim=16, depth=1, heads=2, max_len=12, mixer=name)
    with pytest.raises(ValueError, match="causal-only"):
        bidirectional(ids)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_generation_with_the_cache_equals_recomputing(name):
    torch.manual_seed(0)
    lm = DecoderLM(7, dim=16, depth=2, heads=2, max_len=32, mixer=name).double().eval()
    prompt = torch.randint(0, 7, (2, 5))
    with torch.no_grad():
        cached = lm.generate(prompt, 8, top_k=1)
        ids = prompt
        for _ in range(8):  # recompute the whole prefix every time
            ids = torch.cat([ids, lm(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, ids)
