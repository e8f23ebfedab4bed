"""Masked streaming steps of every causal token mixer (with every causal kernel), and of
the block around it, registry-driven.

``mixer.step(x, state, attention_mask=mask)`` must equal the parallel causal call with the
masks of all steps side by side, with and without rotary positions; a left-padded row must
stream exactly as the row alone (its positions count from its first real token, not
merely up to a relative shift); masked states must stay values.
"""

import pytest
import torch

from formerlab import attention, mixers
from formerlab.mixers.params import takes_kernel
from formerlab.models.block import MetaFormerBlock
from formerlab.testing import assert_states_are_values

F64 = torch.float64
DIM, HEADS = 16, 2
SMALL = {"performer": {"num_features": 16}, "causal_nystrom": {"segment_size": 3}}


def cases():
    """(id, mixer, options): every causal mixer x causal kernel, with and without rope
    (mixers without a kernel once)."""
    out = []
    for name in mixers.available(causal=True):
        if not takes_kernel(name):
            out.append((name, name, {}))
            if name in ("retention", "gla"):  # with their optional short convolution
                out.append((f"{name}-conv", name, {"conv": 3}))
            continue
        for kernel in attention.available(causal=True):
            for rope in (False, True):
                options = {"kernel": kernel, "rope": rope, **SMALL.get(kernel, {})}
                out.append((f"{name}-{kernel}{'-rope' if rope else ''}", name, options))
                if name in ("attention", "metric", "quadratic") and rope:  # with the short convolution
                    out.append((f"{name}-{kernel}-rope-conv", name, {**options, "conv": 3}))
    return out


CASES = cases()
IDS = [c[0] for c in CASES]
CASES = [c[1:] for c in CASES]
# the states-are-values check: with rope where a mixer has it (positions in the state too)
VALUE_CASES = [c for c in CASES if c[1].get("rope", True)]
VALUE_IDS = [i for i, c in zip(IDS, CASES) if c[1].get("rope", True)]


def build(name, options, seed=0):
    torch.manual_seed(seed)
    return mixers.build(name, dim=DIM, heads=HEADS, **options).to(F64).eval()


def stepped(module, x, mask, cuts, state=None):
    if state is None:
        state = module.init_state(x.shape[0], dtype=x.dtype)
    outs = []
    for a, z in zip(cuts, cuts[1:]):
        m = None if mask is None else mask[:, a:z]
        out, state = module.step(x[:, a:z], state, attention_mask=m)
        outs.append(out)
    return torch.cat(outs, dim=1), state


def padded_batch(lengths, extra, seed):
    """Rows of ``lengths`` real tokens (then ``extra`` more), left-padded with junk to one
    width; returns (x (B, width + extra, C), mask, the rows alone)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [torch.randn(1, n + extra, DIM, generator=g, dtype=F64) for n in lengths]
    junk = 5 * torch.randn(len(lengths), width, DIM, generator=g, dtype=F64)
    x = torch.cat(
        [
            torch.cat([junk[i : i + 1, : width - n], r], dim=1)
            for i, (n, r) in enumerate(zip(lengths, rows))
        ]
    )
    mask = (
        torch.arange(width + extra)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
    )
    return x, mask, rows


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_masked_mixer_steps_equal_the_parallel_call(case):
    mixer = build(*case)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 24, DIM, generator=g, dtype=F64)
    mask = torch.arange(24)[None, :] >= torch.tensor([0, 4, 9])[:, None]
    mask[1, 15:17] = False  # padding inside a row too
    ref = mixer(x, attention_mask=mask, causal=True)
    for cuts in ([0, 24], [0, 1, 3, 10, 11, 12, 20, 24], [0, 10, *range(11, 25)]):
        out, _ = stepped(mixer, x, mask, cuts)
        assert real_only(out - ref, mask).abs().max() <= 1e-10, cuts


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_left_padded_row_streams_as_the_row_alone(case):
    mixer = build(*case)
    lengths, extra = [5, 9, 2], 8
    x, mask, rows = padded_batch(lengths, extra, seed=2)
    width = max(lengths)
    out, state = stepped(mixer, x, mask, [0, width])
    tail, _ = stepped(mixer, x[:, width:], None, list(range(extra + 1)), state)
    out = torch.cat([out, tail], dim=1)
    for i, n in enumerate(lengths):
        alone, _ = stepped(mixer, rows[i], None, [0, n, *range(n + 1, n + extra + 1)])
        assert (out[i : i + 1, width - n :] - alone).abs().max() <= 1e-10, (i, n)


def test_rope_positions_count_from_the_first_real_token():
    """Not only relative: with ``linear`` the rotary score is not a function of m - n
    alone, so a left-padded row equals the row alone only if its positions are the row
    alone's, in the parallel call and in the step."""
    mixer = build("attention", {"kernel": "linear", "rope": True})
    x, mask, rows = padded_batch([3, 7], 0, seed=3)
    out = mixer(x, attention_mask=mask, causal=True)
    stepped_out, state = stepped(mixer, x, mask, [0, 7])
    assert state.lead.tolist() == [4, 0] and state.position == 7
    for i, n in enumerate([3, 7]):
        alone = mixer(rows[i], causal=True)
        assert (out[i : i + 1, 7 - n :] - alone).abs().max() <= 1e-12
        assert (stepped_out[i : i + 1, 7 - n :] - alone).abs().max() <= 1e-12
    # shifted positions would change the row: the check can fail
    shifted = mixer(torch.cat([torch.zeros(1, 4, DIM, dtype=F64), rows[0]], 1), causal=True)
    assert (shifted[:, 4:] - mixer(rows[0], causal=True)).abs().max() > 1e-3


def real_only(out, mask):
    """Outputs at real positions (a mixer's output at a padded one is its output
    projection's bias, a block's the MLP of its residual: not part of the contract)."""
    return torch.where(mask[..., None], out, 0)


@pytest.mark.parametrize("case", VALUE_CASES, ids=VALUE_IDS)
def test_masked_mixer_and_block_states_are_values(case):
    mixer = build(*case)
    g = torch.Generator().manual_seed(4)
    n, prompt = 14, 6
    base = torch.randn(2, n, DIM, generator=g, dtype=F64)
    sequences = []
    for branch in range(2):
        x = torch.randn(2, n, DIM, generator=g, dtype=F64)
        x[:, :prompt] = base[:, :prompt]
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, : prompt + 1 + 2 * branch] = False  # row 1 starts after the prompt
        sequences.append([x, mask])
    for module in (mixer, MetaFormerBlock(DIM, mixer).to(F64).eval()):

        def step(xs, state, module=module):
            out, state = module.step(xs[0], state, attention_mask=xs[1])
            return real_only(out, xs[1]), state

        def parallel(x, mask, module=module):
            return real_only(module(x, attention_mask=mask, causal=True), mask)

        assert_states_are_values(
            init=lambda module=module: module.init_state(2, dtype=F64),
            step=step,
            parallel=parallel,
            sequences=sequences,
            prompt=prompt,
            atol=1e-10,
        )


def test_bad_step_masks_are_refused():
    mixer = build("attention", {"kernel": "softmax"})
    state = mixer.init_state(2, dtype=F64)
    x = torch.zeros(2, 3, DIM, dtype=F64)
    with pytest.raises(ValueError, match=r"attention_mask must be bool \(B, N\) = \(2, 3\)"):
        mixer.step(x, state, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask must be bool"):
        mixer.step(x, state, attention_mask=torch.ones(2, 3))
