"""Sort and associative recall: answers are right, only answers are scored, an oracle scores
100%, a constant model scores chance, train and val never share an example."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import data
from formerlab.data import IGNORE_INDEX, Task
from formerlab.data._common import draw_split, is_val_example
from formerlab.data.recall import RecallTask
from formerlab.data.sort import SortTask


def totals_over(task: Task, make_logits, batches: int, batch_size: int = 64) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in task.eval_batches("val", batch_size, batches, seed=5):
        for key, value in task.metrics(make_logits(batch), batch).items():
            totals[key] = totals.get(key, 0.0) + value
    return task.summarize(totals)


def oracle(task: Task):
    def logits(batch):
        return 10.0 * torch.nn.functional.one_hot(batch.targets.clamp_min(0), task.vocab_size).float()

    return logits


def constant(task: Task, token: int):
    def logits(batch):
        out = torch.zeros(*batch.inputs.shape, task.vocab_size)
        out[..., token] = 1.0
        return out

    return logits


def uniform_over(task: Task, tokens: range):
    def logits(batch):
        out = torch.full((*batch.inputs.shape, task.vocab_size), -1e9)
        out[..., tokens.start : tokens.stop] = 0.0
        return out

    return logits


# --- sort ----------------------------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(length=st.integers(2, 24), num_values=st.integers(2, 40), seed=st.integers(0, 2**31))
def test_sort_targets_are_the_sorted_inputs_and_only_they_are_scored(length, num_values, seed):
    task = SortTask(length=length, num_values=num_values)
    b = task.batch("train", 8, torch.Generator().manual_seed(seed))
    assert b.inputs.shape == b.targets.shape == (8, 2 * length) and task.max_len == 2 * length
    x = b.inputs[:, :length]
    assert ((x >= 0) & (x < num_values)).all()
    assert (b.inputs[:, length] == task.vocab.index("|")).all()
    assert (b.targets[:, :length] == IGNORE_INDEX).all()
    answer = b.targets[:, length:]
    assert torch.equal(answer, x.sort(dim=1).values)
    # teacher forcing: the answer tokens seen so far are fed back
    assert torch.equal(b.inputs[:, length + 1 :], answer[:, :-1])


def test_sort_oracle_scores_100_and_constant_scores_chance() -> None:
    task = data.build("sort")  # defaults: 16 values in 0..9
    best = totals_over(task, oracle(task), batches=4)
    assert best["accuracy"] == 1.0 and best["exact_match"] == 1.0
    flat = totals_over(task, constant(task, 3), batches=16)
    base = task.baseline()
    assert base["accuracy"] == pytest.approx(0.1)
    assert abs(flat["accuracy"] - base["accuracy"]) < 0.03  # 16k answer tokens
    assert flat["exact_match"] == 0.0
    blind = totals_over(task, uniform_over(task, range(10)), batches=2)
    assert blind["loss"] == pytest.approx(base["loss"]) == pytest.approx(math.log(10))


def test_sort_tagger_mode_writes_the_sorted_sequence_into_blank_slots() -> None:
    task = data.build("sort", length=8, num_values=6, mode="tagger")
    assert task.kind == "tagger" and task.num_classes == 6 and task.max_len == 17
    b = task.batch("train", 16, torch.Generator().manual_seed(3))
    x = b.inputs[:, :8]
    assert (b.inputs[:, 8] == task.vocab.index("|")).all()
    assert (b.inputs[:, 9:] == task.vocab.index("_")).all()  # the answer is never shown
    assert (b.targets[:, :9] == IGNORE_INDEX).all()
    assert torch.equal(b.targets[:, 9:], x.sort(dim=1).values)

    def tag_oracle(batch):
        return 10.0 * torch.nn.functional.one_hot(batch.targets.clamp_min(0), 6).float()

    assert totals_over(task, tag_oracle, batches=2)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="mode='beam'"):
        data.build("sort", mode="beam")


def test_sort_exact_match_needs_every_answer_token() -> None:
    task = SortTask(length=6, num_values=5)
    batch = next(task.eval_batches("val", 32, 1))
    logits = oracle(task)(batch)
    logits[0, -1] = 0.0
    logits[0, -1, (int(batch.targets[0, -1]) + 1) % 5] = 10.0  # one wrong token in row 0
    m = task.summarize(task.metrics(logits, batch))
    assert m["exact_match"] == pytest.approx(31 / 32)
    assert m["accuracy"] == pytest.approx(1 - 1 / (32 * 6))


def test_train_and_val_never_share_an_example() -> None:
    # a space of only 4**3 = 64 sequences, so overlap would certainly show
    task = SortTask(length=3, num_values=4)
    g = torch.Generator().manual_seed(0)
    train = {tuple(r[:3].tolist()) for _ in range(20) for r in task.batch("train", 64, g).inputs}
    val = {tuple(r[:3].tolist()) for _ in range(20) for r in task.batch("val", 64, g).inputs}
    assert train and val and not train & val
    assert len(train | val) == 64  # and together they cover the space


def test_a_split_that_cannot_be_drawn_is_an_error() -> None:
    # a "task" with a single possible example: one split gets it, the other can never
    only = torch.tensor([[1, 2, 3]])
    home = "val" if bool(is_val_example(only)[0]) else "train"
    away = "train" if home == "val" else "val"

    def draw(n, generator):
        return only.expand(n, 3)

    assert torch.equal(draw_split(draw, home, 5, torch.Generator()), only.expand(5, 3))
    with pytest.raises(ValueError, match="too few distinct"):
        draw_split(draw, away, 5, torch.Generator(), max_rounds=3)


def test_same_generator_seed_same_batches_and_splits_differ() -> None:
    task = data.build("sort")
    a = task.batch("train", 16, torch.Generator().manual_seed(4))
    b = task.batch("train", 16, torch.Generator().manual_seed(4))
    v = task.batch("val", 16, torch.Generator().manual_seed(4))
    assert torch.equal(a.inputs, b.inputs)
    assert not {tuple(r) for r in a.inputs.tolist()} & {tuple(r) for r in v.inputs.tolist()}


@pytest.mark.parametrize(("options", "named"), [({"length": 1}, "length"), ({"num_values": 1}, "num_values")])
def test_sort_bad_options(options, named) -> None:
    with pytest.raises(ValueError, match=named):
        data.build("sort", **options)


# --- recall ----------------------------------------------------------------------------------

def check_recall_batch(task: RecallTask, batch) -> None:
    d, k = task.num_pairs, task.num_keys
    assert batch.inputs.shape == batch.targets.shape == (len(batch.inputs), task.seq_len)
    for row, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        context = row[: 2 * d]
        keys, values = context[0::2], context[1::2]
        assert all(0 <= key < k for key in keys) and len(set(keys)) == d
        assert all(k <= v < k + task.num_values for v in values)
        table = dict(zip(keys, values))
        scored = [p for p, t in enumerate(target) if t != IGNORE_INDEX]
        assert len(scored) == task.num_queries
        asked = [row[p] for p in scored]
        assert all(p >= 2 * d for p in scored) and len(set(asked)) == len(asked)
        for p in scored:
            assert target[p] == table[row[p]]  # the value stored with the queried key
            if p + 1 < len(row):
                assert row[p + 1] == table[row[p]]  # fed back after the query
        others = set(range(2 * d, len(row))) - set(scored) - {p + 1 for p in scored}
        assert all(row[p] == task.filler_id for p in others)


@settings(max_examples=15, deadline=None)
@given(
    pairs=st.integers(1, 10),
    data_=st.data(),
    seed=st.integers(0, 2**31),
)
def test_recall_answers_are_the_queried_values(pairs, data_, seed) -> None:
    queries = data_.draw(st.integers(1, pairs))
    extra = data_.draw(st.integers(0, 40))
    task = RecallTask(
        num_pairs=pairs, num_queries=queries, num_keys=pairs + data_.draw(st.integers(0, 20)),
        num_values=data_.draw(st.integers(2, 20)), seq_len=2 * (pairs + queries) - 1 + extra,
    )
    assert task.max_len == task.seq_len
    check_recall_batch(task, task.batch("train", 8, torch.Generator().manual_seed(seed)))


def test_recall_defaults_and_long_sequences() -> None:
    task = data.build("recall")
    assert task.seq_len == 2 * (8 + 8) - 1
    check_recall_batch(task, task.batch("val", 16, torch.Generator().manual_seed(0)))
    long = data.build("recall", num_pairs=4, num_queries=2, seq_len=256)
    b = long.batch("train", 32, torch.Generator().manual_seed(0))
    check_recall_batch(long, b)
    # queries land at varying distances from the context, not always right after it
    first = [(t != IGNORE_INDEX).nonzero()[0].item() for t in b.targets]
    assert len(set(first)) > 5


def test_recall_oracle_scores_100_and_constant_scores_chance() -> None:
    task = data.build("recall", num_values=16)
    best = totals_over(task, oracle(task), batches=4)
    assert best["accuracy"] == 1.0 and best["exact_match"] == 1.0
    flat = totals_over(task, constant(task, task.num_keys + 5), batches=16)
    base = task.baseline()
    assert base["accuracy"] == pytest.approx(1 / 16)
    assert abs(flat["accuracy"] - base["accuracy"]) < 0.02  # 8k answers
    values = range(task.num_keys, task.num_keys + 16)
    assert totals_over(task, uniform_over(task, values), batches=2)["loss"] == pytest.approx(base["loss"])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"num_queries": 9}, "num_queries"),
        ({"num_pairs": 40, "num_keys": 32}, "num_keys"),
        ({"seq_len": 10}, "seq_len"),
        ({"num_values": 1}, "num_values"),
    ],
)
def test_recall_bad_options(options, named) -> None:
    with pytest.raises(ValueError, match=named):
        data.build("recall", **options)
