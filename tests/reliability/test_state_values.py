"""Streaming states are values, over the registries: ``step`` never changes the state it
is given. From one prompt state two continuations are stepped interleaved token by token,
then the prompt state is stepped a third time; every output equals the parallel causal
call (kernels, mixers, blocks and ``DecoderLM``). A new causal kernel or mixer is checked
with no new test written."""

import pytest
import torch

from formerlab import attention, mixers
from formerlab.mixers.params import takes_kernel
from formerlab.models import DecoderLM
from formerlab.models.block import MetaFormerBlock
from formerlab.testing import assert_states_are_values

F64 = torch.float64
# prompts end inside a segment (causal_nystrom's default s = 32, and s = 4), continuations
# cross segment boundaries and the buffers' growth (64 positions)
PROMPT, N = 40, 100
KERNELS = [(name, {}) for name in attention.available(causal=True)]
KERNELS.append(("causal_nystrom", {"segment_size": 4}))


def branches(shape, seed, count=2):
    """``count`` random sequences of ``shape`` (…, N, ·) that share their first PROMPT positions."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(*shape, generator=g, dtype=F64)
    out = [first]
    for _ in range(count - 1):
        other = torch.randn(*shape, generator=g, dtype=F64)
        other[..., :PROMPT, :] = first[..., :PROMPT, :]
        out.append(other)
    return out


@pytest.mark.parametrize(
    "name, options", KERNELS, ids=[f"{n}{o or ''}" for n, o in KERNELS]
)
def test_kernel_states_are_values(name, options):
    kernel = attention.build(name, **options).eval()
    qs, ks, vs = (branches((1, 2, N, 4), seed) for seed in (1, 2, 3))
    err = assert_states_are_values(
        init=lambda: kernel.init_state(1, 2, 4, dtype=F64),
        step=lambda xs, state: kernel.step(*xs, state),
        parallel=lambda q, k, v: kernel(q, k, v, causal=True),
        sequences=list(zip(qs, ks, vs)), prompt=PROMPT, seq_dim=2,
    )
    assert err <= 1e-8


def mixer_cases():
    out = []
    for name in mixers.available(causal=True):
        kernels = attention.available(causal=True) if takes_kernel(name) else [None]
        for kernel in kernels:
            options = {} if kernel is None else {"kernel": kernel, "rope": True}
            out.append((f"{name}-{kernel}" if kernel else name, name, options))
    return out


@pytest.mark.parametrize("name, options", [c[1:] for c in mixer_cases()], ids=[c[0] for c in mixer_cases()])
def test_mixer_and_block_states_are_values(name, options):
    torch.manual_seed(0)
    mixer = mixers.build(name, dim=16, heads=2, **options).to(F64).eval()
    if not mixer.supports_streaming:
        pytest.skip(f"{name} does not stream")
    xs = branches((1, N, 16), seed=4)
    assert_states_are_values(
        init=lambda: mixer.init_state(1, dtype=F64),
        step=lambda xs, state: mixer.step(xs[0], state),
        parallel=lambda x: mixer(x, causal=True),
        sequences=[[x] for x in xs], prompt=PROMPT,
    )
    block = MetaFormerBlock(16, mixer).to(F64).eval()
    assert_states_are_values(
        init=lambda: block.init_state(1, dtype=F64),
        step=lambda xs, state: block.step(xs[0], state),
        parallel=lambda x: block(x, causal=True),
        sequences=[[x] for x in xs], prompt=PROMPT,
    )


@pytest.mark.parametrize("kernel", ["softmax", "causal_nystrom", "linear"])
def test_decoder_prompt_state_can_be_reused(kernel):
    torch.manual_seed(0)
    options = {"kernel": kernel, **({"segment_size": 8} if kernel == "causal_nystrom" else {})}
    lm = DecoderLM(vocab_size=11, dim=16, depth=2, heads=2, max_len=N, mixer_options=options)
    lm = lm.to(F64).eval()
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 11, (2, N), generator=g) for _ in range(3)]
    for other in ids[1:]:
        other[:, :PROMPT] = ids[0][:, :PROMPT]
    assert_states_are_values(
        init=lambda: lm.init_state(2), step=lambda xs, state: lm.step(xs[0], state),
        parallel=lm, sequences=[[i] for i in ids], prompt=PROMPT,
    )


def storages(states, field):
    return {getattr(s, field).untyped_storage().data_ptr() for s in states}


@pytest.mark.parametrize("name, field", [("softmax", "keys"), ("causal_nystrom", "land_k")])
def test_a_single_stream_appends_in_place(name, field):
    """One path never copies beyond the geometric growth (amortised O(1) per token): 600
    tokens one at a time use at most log2(600/64) + 2 buffers; a branch copies."""
    kernel = attention.build(name, **({"segment_size": 2} if name == "causal_nystrom" else {}))
    state = kernel.init_state(1, 1, 4, dtype=F64)
    x = torch.randn(1, 1, 600, 4, dtype=F64)
    states = []
    for t in range(600):
        _, state = kernel.step(x[:, :, t : t + 1], x[:, :, t : t + 1], x[:, :, t : t + 1], state)
        states.append(state)
    assert len(storages(states, field)) <= 6
    # stepping an old state again copies its prefix instead of writing over its successor
    _, branch = kernel.step(x[:, :, :1], x[:, :, :1], x[:, :, :1], states[400])
    assert storages([branch], field).isdisjoint(storages(states, field))
