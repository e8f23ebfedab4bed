"""pack_batch / pack_examples against the padded batches they come from (ground truth
built row by row in Python)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab.data import IGNORE_INDEX, Batch
from formerlab.data.packing import pack_batch, pack_examples, padding_fraction, real_tokens


def ragged_batch(lengths, width=None, kind="decoder", left=False, seed=0):
    """A padded batch of rows of ``lengths`` real tokens (pad id 0, targets IGNORE there)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    inputs = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    targets = torch.full((len(lengths), width), IGNORE_INDEX)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        inputs[row, cols] = torch.randint(1, 50, (n,), generator=g)
        mask[row, cols] = True
        targets[row, cols] = torch.randint(0, 7, (n,), generator=g)
    if kind == "encoder":
        targets = torch.randint(0, 3, (len(lengths),), generator=g)
    return Batch(inputs, targets, mask)


@pytest.mark.parametrize("left", [False, True])
def test_packed_row_is_the_real_tokens_in_order(left):
    batch = ragged_batch([3, 5, 1, 4], width=6, left=left)
    packed = pack_batch(batch, "decoder")
    rows = [batch.inputs[b][batch.attention_mask[b]] for b in range(4)]
    want_targets = [batch.targets[b][batch.attention_mask[b]] for b in range(4)]
    assert packed.inputs.shape == (1, 13)
    assert torch.equal(packed.inputs[0], torch.cat(rows))
    assert torch.equal(packed.targets[0], torch.cat(want_targets))
    assert packed.cu_seqlens.tolist() == [0, 3, 8, 9, 13]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.tokens == real_tokens(batch) == 13
    assert packed.padding_fraction == pytest.approx(1 - 13 / 24) == padding_fraction(batch)


def test_unpack_puts_logits_back_where_the_tokens_were():
    batch = ragged_batch([2, 4, 3], width=5)
    packed = pack_batch(batch, "tagger")
    padded = torch.randn(3, 5, 7, dtype=torch.float64)
    mask = batch.attention_mask
    packed_logits = padded[mask][None].requires_grad_()  # what a model gives packed
    back = packed.unpack(packed_logits)
    assert torch.equal(back, padded * mask[..., None])  # zeros on padding
    back.sum().backward()  # gradients reach every packed logit once
    assert torch.equal(packed_logits.grad, torch.ones_like(packed_logits))


def test_encoder_targets_and_logits_stay_one_per_example():
    batch = ragged_batch([2, 6, 1], kind="encoder")
    packed = pack_batch(batch, "encoder")
    assert torch.equal(packed.targets, batch.targets)
    logits = torch.randn(3, 2)
    assert packed.unpack(logits) is logits
    with pytest.raises(ValueError, match="3 rows"):
        packed.unpack(torch.randn(2, 2))


def test_without_a_mask_every_row_is_one_whole_sequence():
    batch = Batch(torch.arange(12).view(3, 4), torch.arange(12).view(3, 4))
    packed = pack_batch(batch, "decoder")
    assert packed.cu_seqlens.tolist() == [0, 4, 8, 12]
    assert torch.equal(packed.inputs[0], torch.arange(12))
    assert torch.equal(packed.targets[0], torch.arange(12))
    assert packed.padding_fraction == 0.0


def test_bad_batches_are_refused_naming_what_is_wrong():
    batch = ragged_batch([2, 3])
    with pytest.raises(ValueError, match="kind='lm'"):
        pack_batch(batch, "lm")
    holes = Batch(batch.inputs, batch.targets, torch.tensor([[True, False, True], [True] * 3]))
    with pytest.raises(ValueError, match=r"row 0 is \[1, 0, 1\].*contiguous"):
        pack_batch(holes, "decoder")
    empty = Batch(batch.inputs, batch.targets, torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="row 0"):
        pack_batch(empty, "decoder")
    scored_pad = Batch(batch.inputs, torch.zeros_like(batch.targets), batch.attention_mask)
    with pytest.raises(ValueError, match="padded positions.*IGNORE_INDEX"):
        pack_batch(scored_pad, "decoder")
    with pytest.raises(
        ValueError, match=r"targets of a kind='encoder' batch must have shape \(2,\)"
    ):
        pack_batch(batch, "encoder")
    with pytest.raises(ValueError, match="5 real tokens, more than max_tokens=4"):
        pack_batch(batch, "decoder", max_tokens=4)
    assert pack_batch(batch, "decoder", max_tokens=5).tokens == 5


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=12), st.integers(9, 20))
def test_pack_examples_fills_rows_in_order_without_splitting(lengths, budget):
    examples = [(list(range(100 * i + 1, 100 * i + 1 + n)), [i] * n) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, "tagger", budget)
    seen = []
    for packed in rows:
        assert packed.tokens <= budget
        offsets = packed.cu_seqlens.tolist()
        for a, b in zip(offsets[:-1], offsets[1:]):  # each sequence: one whole example
            ids = packed.inputs[0, a:b].tolist()
            i = packed.targets[0, a].item()
            assert ids == examples[i][0] and packed.targets[0, a:b].tolist() == [i] * (b - a)
            seen.append(i)
    assert seen == list(range(len(lengths)))  # all of them, in order
    for first, second in zip(rows[:-1], rows[1:]):  # a row closes only when the next would not fit
        assert first.tokens + (second.cu_seqlens[1].item()) > budget


def test_pack_examples_refuses_an_example_longer_than_the_budget():
    examples = [([1, 2], 0), ([1, 2, 3, 4, 5], 1)]
    with pytest.raises(ValueError, match="example 1 has 5 tokens; expected 1 to max_tokens=4"):
        pack_examples(examples, "encoder", 4)
    rows = pack_examples(examples, "encoder", 7)
    assert len(rows) == 1 and rows[0].targets.tolist() == [0, 1]
