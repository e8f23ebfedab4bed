"""Streaming state of every causal kernel (init_state / step), registry-driven.

Stepping one token at a time, in uneven chunks, or a prompt in one step followed by
single tokens must equal the parallel causal call on the whole sequence (<= 1e-8 in
float64, <= 1e-4 in float32 over 500 tokens). The parametrisation reads
``attention.available(causal=True)``: a new causal kernel is checked without a new test.
"""

import pytest
import torch

from formerlab import attention
from formerlab.attention.streaming import GROW_CHUNK, state_nbytes

CAUSAL = attention.available(causal=True)
CONSTANT_STATE = ["linear", "performer"]
N = 500
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def _qkv(b=1, h=2, n=N, d=4, e=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, torch.randn(b, h, n, e, generator=g, dtype=dtype)


def _stream(kernel, q, k, v, cuts, state=None):
    """Outputs of stepping through the positions between consecutive ``cuts``."""
    b, h, _, d = q.shape
    if state is None:
        state = kernel.init_state(b, h, d, dtype=q.dtype, value_dim=v.shape[-1])
    outs = []
    for a, z in zip(cuts, cuts[1:]):
        out, state = kernel.step(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def test_every_causal_kernel_streams():
    for name in CAUSAL:
        assert attention.build(name).supports_streaming, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", CAUSAL)
def test_one_token_at_a_time_equals_the_parallel_call(name, dtype):
    kernel = attention.build(name).eval()
    q, k, v = _qkv(dtype=dtype)
    ref = kernel(q, k, v, causal=True)
    out, state = _stream(kernel, q, k, v, list(range(N + 1)))
    assert out.dtype == dtype and out.shape == ref.shape
    assert _max_err(out, ref) <= TOL[dtype]
    assert state.length == N


@pytest.mark.parametrize("name", CAUSAL)
def test_uneven_chunks_and_a_prompt_equal_the_parallel_call(name):
    kernel = attention.build(name).eval()
    q, k, v = _qkv(n=300, d=3, e=5, seed=1)  # value size != key size
    ref = kernel(q, k, v, causal=True)
    # chunks straddle segment (32) and chunk (64) boundaries and the cache growth (64)
    uneven = [0, 1, 8, 31, 33, 34, 97, 160, 161, 229, 300]
    out, state = _stream(kernel, q, k, v, uneven)
    assert _max_err(out, ref) <= 1e-8 and state.length == 300
    prompt = [0, 70, *range(71, 300 + 1)]  # a 70-token prompt in one step, then tokens
    out, _ = _stream(kernel, q, k, v, prompt)
    assert _max_err(out, ref) <= 1e-8


@pytest.mark.parametrize("name", CAUSAL)
def test_bfloat16_inputs_keep_a_float32_state(name):
    kernel = attention.build(name).eval()
    q, k, v = _qkv(n=120, seed=2, dtype=torch.bfloat16)
    out, state = _stream(kernel, q, k, v, [0, 50, *range(51, 121)])
    assert out.dtype == torch.bfloat16
    tensors = [getattr(state, f) for f in state.__dataclass_fields__]
    assert all(t.dtype == torch.float32 for t in tensors if isinstance(t, torch.Tensor))
    # against the float32 parallel call on the same (bf16-rounded) inputs
    ref = kernel(q.float(), k.float(), v.float(), causal=True)
    assert _max_err(out, ref) <= 2e-2


@pytest.mark.parametrize("name", CONSTANT_STATE)
def test_feature_map_state_memory_is_flat(name):
    kernel = attention.build(name).eval()
    q, k, v = _qkv(n=400, seed=3)
    state = kernel.init_state(1, 2, 4, dtype=torch.float64)
    sizes = []
    for i in range(400):
        _, state = kernel.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state)
        sizes.append(state_nbytes(state))
    assert len(set(sizes)) == 1 and sizes[0] == state_nbytes(kernel.init_state(1, 2, 4, dtype=torch.float64))


def test_softmax_cache_grows_in_preallocated_chunks():
    kernel = attention.build("softmax")
    q, k, v = _qkv(n=N, seed=4)
    state = kernel.init_state(1, 2, 4, dtype=torch.float64)
    capacities, buffers = [], set()
    for i in range(N):
        _, state = kernel.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state)
        capacities.append(state.keys.shape[2])
        buffers.add(state.keys.data_ptr())
    assert state.length == N and all(c >= i + 1 for i, c in enumerate(capacities))
    assert capacities[-1] <= 2 * N + GROW_CHUNK  # amortised: at most doubling
    assert len(buffers) <= 5  # 64 -> 128 -> 256 -> 512: a few reallocations, not one per token


def test_causal_nystrom_state_is_open_segment_plus_one_landmark_per_segment():
    kernel = attention.build("causal_nystrom")  # default s = 32
    q, k, v = _qkv(n=N, seed=5)
    _, state = _stream(kernel, q, k, v, [0, 100, 101, 250, N])
    assert state.k_open.shape[2] == 32 and state.open_len == N % 32
    assert state.landmarks == N // 32 and state.land_k.shape[2] <= 2 * (N // 32) + GROW_CHUNK


def test_performer_state_keeps_its_features_after_a_redraw():
    kernel = attention.build("performer", num_features=16)
    q, k, v = _qkv(n=60, seed=6)
    ref = kernel(q, k, v, causal=True)
    head, state = _stream(kernel, q, k, v, [0, 30])
    kernel.redraw()  # a new draw for new states; the running state keeps its own
    tail, _ = _stream(kernel, q, k, v, [30, 45, 60], state)
    assert _max_err(torch.cat([head, tail], 2), ref) <= 1e-8
    assert _max_err(kernel(q, k, v, causal=True), ref) > 1e-3  # the draw did change


def test_triangular_landmarks_refuse_to_stream():
    kernel = attention.build("causal_nystrom", landmark_system="triangular")
    with pytest.raises(ValueError, match="landmark_system='block'"):
        kernel.init_state(1, 1, 4)


@pytest.mark.parametrize("name", CAUSAL)
def test_bad_state_arguments_raise(name):
    kernel = attention.build(name)
    with pytest.raises(ValueError, match="batch"):
        kernel.init_state(0, 2, 4)
    with pytest.raises(ValueError, match="dtype"):
        kernel.init_state(1, 2, 4, dtype=torch.int64)
    state = kernel.init_state(1, 2, 4)
    q, k, v = _qkv(n=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="q has shape"):
        kernel.step(q[:, :1], k[:, :1], v[:, :1], state)  # one head, state has two
    with pytest.raises(ValueError, match="T >= 1"):
        kernel.step(q[:, :, :0], k[:, :, :0], v[:, :, :0], state)
    with pytest.raises(ValueError, match="state must be"):
        kernel.step(q, k, v, object())


def test_non_streaming_kernels_raise_naming_themselves():
    for name in sorted(set(attention.available()) - set(CAUSAL)):
        kernel = attention.build(name)
        assert not kernel.supports_streaming
        with pytest.raises(NotImplementedError, match=name):
            kernel.init_state(1, 1, 4)
        with pytest.raises(NotImplementedError, match=name):
            kernel.step(*_qkv(n=2), None)


@pytest.mark.parametrize("name", CAUSAL)
def test_large_logits_stream_finite_and_equal_float32(name):
    # logits |q·k|/√D in the hundreds: the shifts, not luck, keep exp() finite
    kernel = attention.build(name).eval()
    q, k, v = _qkv(n=100, seed=7, dtype=torch.float32)
    q, k = 12.0 * q, 12.0 * k
    ref = kernel(q, k, v, causal=True)
    out, _ = _stream(kernel, q, k, v, [0, 45, *range(46, 101)])
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert _max_err(out, ref) <= 1e-4


def _two_sided(x):
    # a custom feature map with F = 2·D features (positive)
    return torch.cat([torch.nn.functional.elu(x) + 1, torch.nn.functional.elu(-x) + 1], dim=-1)


def test_linear_streams_with_a_feature_map_that_changes_the_size():
    kernel = attention.build("linear", feature_map=_two_sided)
    q, k, v = _qkv(n=90, seed=8)
    out, state = _stream(kernel, q, k, v, [0, 20, 21, 64, 90])
    assert state.kv.shape == (1, 2, 8, 4) and state.k_sum.shape == (1, 2, 8)
    assert _max_err(out, kernel(q, k, v, causal=True)) <= 1e-8
    with pytest.raises(ValueError, match="features"):  # a state built for another D
        kernel.step(*_qkv(n=1, d=6), state)


@pytest.mark.parametrize(
    "name", [n for n in CAUSAL if "scale" in attention.KERNELS.entry(n).options()]
)
def test_streaming_honours_the_logit_scale(name):
    kernel = attention.build(name, scale=0.2)
    q, k, v = _qkv(n=80, seed=9)
    ref = kernel(q, k, v, causal=True)
    assert _max_err(ref, attention.build(name)(q, k, v, causal=True)) > 1e-3  # scale acts
    out, _ = _stream(kernel, q, k, v, [0, 33, *range(34, 81)])
    assert _max_err(out, ref) <= 1e-8
