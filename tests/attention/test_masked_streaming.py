"""Masked streaming steps of every causal kernel, registry-driven.

``kernel.step(q, k, v, state, attention_mask=mask)`` must equal the parallel causal call
with the masks of all steps side by side (left, middle and right padding, rows without
any real token), whatever the chunking; a left-padded batch must give each row exactly
what the row alone gives when stepped (so prompts of different lengths decode in one
batch); what sits in padded slots must not matter; and masked states must stay values.
``causal_nystrom`` is run at several segment sizes: its rows are segmented from their
own first real token (a per-row phase), the delicate case.
"""

import pytest
import torch

from formerlab import attention
from formerlab.testing import assert_states_are_values

F64 = torch.float64
# performer with few features: the property is the same, the tests much faster
SMALL = {"performer": {"num_features": 16}}
KERNELS = [(name, SMALL.get(name, {})) for name in attention.available(causal=True)]
KERNELS += [("causal_nystrom", {"segment_size": s}) for s in (1, 3, 4)]
IDS = [f"{n}{o or ''}" for n, o in KERNELS]
H, D, E = 2, 4, 3


def qkv(b, n, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, H, n, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, torch.randn(b, H, n, E, generator=g, dtype=dtype)


def stream(kernel, q, k, v, mask, cuts, state=None):
    """Outputs of masked steps over the positions between consecutive ``cuts``."""
    if state is None:
        state = kernel.init_state(q.shape[0], H, D, dtype=q.dtype, value_dim=E)
    outs = []
    for a, z in zip(cuts, cuts[1:]):
        m = None if mask is None else mask[:, a:z]
        out, state = kernel.step(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], state, attention_mask=m)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def masks(n):
    """Left padding of 0, 3, 7, 9 (rows out of phase for any segment size), then the same
    with padding inside and after the real tokens, and a row that is all padding."""
    g = torch.Generator().manual_seed(n)
    left = torch.arange(n)[None, :] >= torch.tensor([0, 3, 7, 9])[:, None]
    holes = left & (torch.rand(4, n, generator=g) > 0.3)
    holes[2] = False
    holes[3, -4:] = False
    return {"left": left, "holes": holes}


def cuts_of(n, kind):
    if kind == "tokens":
        return list(range(n + 1))
    if kind == "prompt":
        return [0, 13, *range(14, n + 1)]
    return [0, 1, 5, 6, 14, 22, 23, 30, 41, n]  # uneven, across segments of 3 and 4


@pytest.mark.parametrize("cuts", ["tokens", "prompt", "uneven"])
@pytest.mark.parametrize("pattern", ["left", "holes"])
@pytest.mark.parametrize("name, options", KERNELS, ids=IDS)
def test_masked_steps_equal_the_parallel_call_with_the_mask(name, options, pattern, cuts):
    kernel = attention.build(name, **options).eval()
    n = 45
    q, k, v = qkv(4, n, seed=1)
    mask = masks(n)[pattern]
    ref = kernel(q, k, v, attention_mask=mask, causal=True)
    out, state = stream(kernel, q, k, v, mask, cuts_of(n, cuts))
    assert out.dtype == F64 and out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-10
    assert not out.masked_select(~mask[:, None, :, None]).any()  # padded queries give 0
    assert state.length == n


@pytest.mark.parametrize("name, options", KERNELS, ids=IDS)
def test_a_left_padded_batch_streams_each_row_as_alone(name, options):
    """Prompts of 5, 9 and 2 tokens, left-padded into one step, then 20 tokens one at a
    time: every row equals the row stepped alone (prompt, then the same tokens)."""
    kernel = attention.build(name, **options).eval()
    lengths, extra = [5, 9, 2], 20
    width = max(lengths)
    rows = [qkv(1, n + extra, seed=10 + i) for i, n in enumerate(lengths)]
    junk = qkv(len(lengths), width, seed=3)
    batch = []
    for j in range(3):  # q, k, v: junk in the padded slots, each prompt right-aligned
        padded = [
            torch.cat([junk[j][i : i + 1, :, : width - n], rows[i][j]], dim=2)
            for i, n in enumerate(lengths)
        ]
        batch.append(torch.cat(padded))
    mask = (
        torch.arange(width + extra)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
    )
    out, _ = stream(kernel, *batch, mask[:, :width], [0, width])  # the prompts: one masked step
    tail, _ = stream(
        kernel, *(t[:, :, width:] for t in batch), None, list(range(extra + 1)), state=_
    )
    out = torch.cat([out, tail], dim=2)
    for i, n in enumerate(lengths):
        alone, _ = stream(kernel, *rows[i], None, [0, n, *range(n + 1, n + extra + 1)])
        assert (out[i : i + 1, :, width - n :] - alone).abs().max() <= 1e-10, (i, n)
        assert not out[i, :, : width - n].any()


@pytest.mark.parametrize("name, options", KERNELS, ids=IDS)
def test_padded_slots_do_not_matter(name, options):
    """Large random junk in the padded slots (two draws) gives the same outputs, and the
    states carry nothing of it: the next steps agree as well."""
    kernel = attention.build(name, **options).eval()
    n = 30
    q, k, v = qkv(4, n, seed=4)
    mask = masks(n)["holes"]
    outs = []
    for seed in (5, 6):
        junk = [100 * t for t in qkv(4, n, seed=seed)]
        filled = [torch.where(mask[:, None, :, None], t, j) for t, j in zip((q, k, v), junk)]
        outs.append(stream(kernel, *filled, mask, [0, 17, *range(18, n + 1)])[0])
    assert (outs[0] - outs[1]).abs().max() <= 1e-12
    # the junk must matter where it is not masked: the comparison can fail
    unmasked = stream(kernel, *[100 * t for t in qkv(4, n, seed=5)], None, [0, n])[0]
    assert (unmasked - outs[0]).abs().max() > 1e-3


def branch_inputs(seed, prompt, n, b=3):
    """Two input lists (q, k, v, mask (B, 1, N)) sharing their first ``prompt`` positions:
    rows left-padded by 0, 7 and all of the prompt (the third row starts in the
    continuation, at a different position in each branch), continuations of different
    tokens. With a prompt of 12 and segments of 3 or 4, row 1 is a landmark behind row 0
    when the branches start, and finishes that segment in the continuation's first token:
    a branch must not see the landmark its sibling wrote there."""
    out = []
    q0, k0, v0 = qkv(b, n, seed)
    for branch in range(2):
        q, k, v = qkv(b, n, seed + 1 + branch)
        for t, t0 in zip((q, k, v), (q0, k0, v0)):
            t[:, :, :prompt] = t0[:, :, :prompt]
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[1, :7] = False
        mask[2, : prompt + 2 + 3 * branch] = False
        out.append([q, k, v, mask[:, None, :]])
    return out


@pytest.mark.parametrize("name, options", KERNELS, ids=IDS)
def test_masked_states_are_values(name, options):
    kernel = attention.build(name, **options).eval()
    err = assert_states_are_values(
        init=lambda: kernel.init_state(3, H, D, dtype=F64, value_dim=E),
        step=lambda xs, state: kernel.step(*xs[:3], state, attention_mask=xs[3][:, 0]),
        parallel=lambda q, k, v, m: kernel(q, k, v, attention_mask=m[:, 0], causal=True),
        sequences=branch_inputs(seed=7, prompt=12, n=40),
        prompt=12,
        seq_dim=2,
    )
    assert err <= 1e-10


def test_nystrom_rows_keep_their_own_segment_phase():
    """Rows left-padded by 0, 1, 2 at s = 4 are segmented from their first real token:
    after 11 positions they hold 2, 2, 2 landmarks and 3, 2, 1 open tokens; the state
    keeps the 3 newest positions (the longest open segment) and the first real positions."""
    kernel = attention.build("causal_nystrom", segment_size=4)
    q, k, v = qkv(3, 11, seed=8)
    mask = torch.arange(11)[None, :] >= torch.tensor([0, 1, 2])[:, None]
    _, state = stream(kernel, q, k, v, mask, [0, 11])
    assert state.first == (0, 1, 2) and state.open_len == 3 and state.landmarks == 2
    assert state.open_real[:, 0, :3].all()
    # one more token: row 0 (11 - 0 = 12 = 3 segments) finishes its third segment first
    _, state = stream(kernel, *(t[:, :, :1] for t in qkv(3, 1, seed=9)), None, [0, 1], state)
    assert state.landmarks == 3 and state.open_len == 3  # rows 1, 2 still open: 3 and 2
    assert torch.isfinite(state.land_c[0, :, :3]).all()


def test_nystrom_masked_stream_appends_in_place_and_branches_copy():
    """The per-row landmark buffers of a left-padded stream (rows out of phase, a landmark
    apart) are still shared append-only buffers: 200 tokens one at a time use a few
    buffers (geometric growth), and stepping an old state again copies."""
    kernel = attention.build("causal_nystrom", segment_size=2)
    q, k, v = qkv(2, 201, seed=11)
    mask = torch.ones(2, 201, dtype=torch.bool)
    mask[1, 0] = False  # row 1 is one position out of phase with row 0
    state = kernel.init_state(2, H, D, dtype=F64, value_dim=E)
    states = []
    for t in range(200):
        cut = slice(t, t + 1)
        _, state = kernel.step(
            q[:, :, cut], k[:, :, cut], v[:, :, cut], state, attention_mask=mask[:, cut]
        )
        states.append(state)
    storages = {s.land_k.untyped_storage().data_ptr() for s in states}
    assert len(storages) <= 3  # 100 landmarks: capacity 64, then 128
    old = states[150]
    _, branch = kernel.step(q[:, :, 200:], k[:, :, 200:], v[:, :, 200:], old)
    assert branch.land_k.untyped_storage().data_ptr() not in storages
    ref = kernel(q, k, v, attention_mask=mask, causal=True)
    again, _ = kernel.step(q[:, :, 151:], k[:, :, 151:], v[:, :, 151:], old)
    assert (again - ref[:, :, 151:]).abs().max() <= 1e-10


@pytest.mark.parametrize(
    "name, options",
    KERNELS[: len(attention.available(causal=True))],
    ids=IDS[: len(attention.available(causal=True))],
)
def test_float32_masked_steps(name, options):
    kernel = attention.build(name, **options).eval()
    q, k, v = qkv(4, 45, seed=12, dtype=torch.float32)
    mask = masks(45)["left"]
    ref = kernel(q.double(), k.double(), v.double(), attention_mask=mask, causal=True)
    out, _ = stream(kernel, q, k, v, mask, cuts_of(45, "uneven"))
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", attention.available(causal=True))
def test_bad_step_masks_are_refused(name):
    kernel = attention.build(name)
    state = kernel.init_state(2, H, D, value_dim=E)
    q, k, v = qkv(2, 3, seed=0, dtype=torch.float32)
    for bad in (
        torch.ones(2, 4, dtype=torch.bool),
        torch.ones(2, 3),
        torch.ones(3, dtype=torch.bool),
    ):
        with pytest.raises(
            ValueError, match=r"attention_mask of a step must be bool \(B, T\) = \(2, 3\)"
        ):
            kernel.step(q, k, v, state, attention_mask=bad)
