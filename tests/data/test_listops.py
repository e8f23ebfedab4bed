"""ListOps: the reference evaluator, the generator's labels, lengths, determinism, splits."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import data
from formerlab.data import listops
from formerlab.data.listops import PAD_ID, VOCAB, ListOps, evaluate

SMALL = dict(min_len=8, max_len=60, max_depth=4, max_args=4, train_size=300, val_size=100)


@pytest.fixture(scope="module")
def task() -> ListOps:
    return ListOps(**SMALL, seed=3)


# --- an independent evaluator over nested Python lists, to check ``evaluate`` ---------

def tree_value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, *children = tree
    args = [tree_value(c) for c in children]
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":  # LRA: int(np.median(args)): mean of the middle pair, truncated
        return int(statistics.median(args))
    return sum(args) % 10


def tree_text(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, *children = tree
    return " ".join([op, *(tree_text(c) for c in children), "]"])


trees = st.recursive(
    st.integers(0, 9),
    lambda inner: st.tuples(st.sampled_from(listops.OPERATORS), inner, inner)
    .flatmap(lambda t: st.lists(inner, max_size=3).map(lambda more: (*t, *more))),
    max_leaves=25,
)


@settings(max_examples=60, deadline=None)
@given(trees)
def test_evaluate_matches_independent_recursive_evaluator(tree) -> None:
    assert evaluate(tree_text(tree)) == tree_value(tree)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("7", 7),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 5 [MAX 1 3 ] 8 ]", 3),
        ("[MED 1 2 ]", 1),  # median 1.5, truncated as in LRA
        ("[MED 2 5 ]", 3),
        ("[MED 3 8 1 ]", 3),
        ("[SM 5 7 9 ]", 1),
        ("[SM [MAX 9 9 ] [MED 4 6 0 9 ] ]", 4),  # 9 + int(5.0) = 14 -> 4
        ("( ( ( [SM 4 ) 8 ) ] )", 2),  # LRA's bracketed form
    ],
)
def test_evaluate_known_values(text: str, value: int) -> None:
    assert evaluate(text) == value


@pytest.mark.parametrize("text", ["[MAX 2", "]", "[MAX ]", "1 2", "[FOO 1 ]", "[MIN 1 12 ]", ""])
def test_evaluate_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        evaluate(text)


# --- generated data ----------------------------------------------------------------------

def structure(tokens: list[str]) -> tuple[int, int]:
    """(operator nesting depth, most arguments of any operator) of a token list."""
    depth = deepest = widest = 0
    counts: list[int] = []
    for t in tokens:
        if t in listops.OPERATORS:
            if counts:
                counts[-1] += 1
            counts.append(0)
            depth += 1
            deepest = max(deepest, depth)
        elif t == "]":
            widest = max(widest, counts.pop())
            depth -= 1
        elif counts:
            counts[-1] += 1
    return deepest, widest


def test_every_label_agrees_with_reference_and_lengths_in_range(task: ListOps) -> None:
    for split, size in (("train", SMALL["train_size"]), ("val", SMALL["val_size"])):
        examples = list(task.examples(split))
        assert len(examples) == size
        for ids, label in examples:
            tokens = [VOCAB[i] for i in ids]
            assert SMALL["min_len"] <= len(ids) <= SMALL["max_len"]
            assert label == evaluate(tokens)
            depth, width = structure(tokens)
            # LRA depth counts the leaves' level: operators nest at most max_depth - 1 deep
            assert depth <= SMALL["max_depth"] - 1
            assert width <= SMALL["max_args"]
        assert len({tuple(ids) for ids, _ in examples}) == size  # distinct, as in LRA


def test_same_seed_same_data_and_splits_differ(task: ListOps, monkeypatch) -> None:
    monkeypatch.setattr(listops, "_POOLS", {})  # force regeneration, not the process cache
    again = ListOps(**SMALL, seed=3)
    assert list(again.examples("train")) == list(task.examples("train"))
    assert list(again.examples("val")) == list(task.examples("val"))
    other = ListOps(**SMALL, seed=4)
    assert list(other.examples("train")) != list(task.examples("train"))
    train = {tuple(ids) for ids, _ in task.examples("train")}
    assert not train & {tuple(ids) for ids, _ in task.examples("val")}
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    b1, b2 = task.batch("train", 8, g1), task.batch("train", 8, g2)
    assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.targets, b2.targets)


def test_batches_pad_with_mask_and_keep_tokens(task: ListOps) -> None:
    pool = list(task.examples("train"))
    by_tokens = {tuple(ids): label for ids, label in pool}
    b = task.batch("train", 16, torch.Generator().manual_seed(1))
    assert task.kind == "encoder" and task.num_classes == 10
    assert b.inputs.dtype == torch.int64 and b.attention_mask.dtype == torch.bool
    assert b.inputs.shape[1] == int(b.attention_mask.sum(1).max())  # padded to the longest
    for row, mask, label in zip(b.inputs, b.attention_mask, b.targets):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, then padding
        assert (row[n:] == PAD_ID).all()
        assert by_tokens[tuple(row[:n].tolist())] == int(label)


def test_eval_walks_val_pool_in_order(task: ListOps) -> None:
    labels = [label for _, label in task.examples("val")]
    walked = torch.cat([b.targets for b in task.eval_batches("val", 32, max_batches=100)])
    assert walked.tolist() == labels  # 100 examples, 4 batches, none twice
    capped = list(task.eval_batches("val", 32, max_batches=2))
    assert sum(len(b.targets) for b in capped) == 64


def test_baseline_is_train_majority_scored_on_val(task: ListOps) -> None:
    train = Counter(label for _, label in task.examples("train"))
    val = [label for _, label in task.examples("val")]
    majority = train.most_common(1)[0][0]
    base = task.baseline()
    assert base["accuracy"] == pytest.approx(val.count(majority) / len(val))
    assert 0.0 < base["loss"] < 2.5  # a proper prior over 10 classes: near log(10) = 2.30


def test_disk_cache_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(listops, "_POOLS", {})
    options = dict(SMALL, train_size=40, val_size=10, seed=11)
    first = ListOps(**options, cache_dir=tmp_path)
    expected = list(first.examples("train")), list(first.examples("val"))
    assert len(list(tmp_path.glob("listops-*.safetensors"))) == 1
    monkeypatch.setattr(listops, "_POOLS", {})
    monkeypatch.setattr(listops, "generate", None)  # a second task must load, not generate
    second = ListOps(**options, cache_dir=tmp_path)
    assert (list(second.examples("train")), list(second.examples("val"))) == expected


def test_lra_setting_is_reachable() -> None:
    task = ListOps(min_len=500, max_len=2000, max_depth=10, max_args=10, train_size=6, val_size=2)
    for ids, label in task.examples("train"):
        assert 500 <= len(ids) <= 2000
        assert label == evaluate([VOCAB[i] for i in ids])
    assert task.max_len == 2000


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(min_len=50, max_len=40), "max_len"),
        (dict(max_depth=2, max_args=3, min_len=10), "min_len"),
        (dict(operator_prob=1.5), "operator_prob"),
        (dict(max_args=1), "max_args"),
        (dict(train_size=0), "train_size"),
    ],
)
def test_bad_options_name_the_argument(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        data.build("listops", **options)


def test_encode_decode_round_trip() -> None:
    task = data.build("listops")
    text = "[MAX 2 9 [MIN 4 7 ] 0 ]"
    assert task.decode(task.encode(text)) == text
    with pytest.raises(ValueError, match="token"):
        task.encode("[MAX 2 x ]")


def parse_tree(ids: list[int]):
    """Token ids -> (operator id, children...) nested tuples; digits stay ids."""
    stack: list[list] = [[None]]
    for i in ids:
        if i in listops._OPERATOR_IDS:
            stack.append([i])
        elif i == listops._CLOSE_ID:
            node = tuple(stack.pop())
            stack[-1].append(node)
        else:
            stack[-1].append(i)
    (root,) = stack[0][1:]
    return root


def shape_of(tree, depth: int = 1) -> tuple[int, list[int]]:
    """(depth of the deepest node, argument counts of every operator node)."""
    if not isinstance(tree, tuple):
        return depth, []
    deepest, counts = depth, [len(tree) - 1]
    for child in tree[1:]:
        d, c = shape_of(child, depth + 1)
        deepest, counts = max(deepest, d), counts + c
    return deepest, counts


def test_lra_setting_trees_follow_the_published_generator_settings() -> None:
    # LRA's ListOps: depth <= 10, 2..10 arguments per operator, 500 <= length <= 2000,
    # operators MAX, MIN, MED, SM; labels 0-9 from the expression's value
    task = ListOps(min_len=500, max_len=2000, max_depth=10, max_args=10, train_size=60,
                   val_size=2, seed=5)
    lengths, labels, arg_counts, operators = [], Counter(), Counter(), Counter()
    for ids, label in task.examples("train"):
        depth, counts = shape_of(parse_tree(ids))
        assert depth <= 10 and all(2 <= c <= 10 for c in counts)
        lengths.append(len(ids))
        labels[label] += 1
        arg_counts.update(counts)
        operators.update(i for i in ids if i in listops._OPERATOR_IDS)
    assert 500 <= min(lengths) and max(lengths) <= 2000
    assert set(arg_counts) == set(range(2, 11))  # every argument count is drawn
    assert len(operators) == 4  # all four operators occur
    # long expressions mostly start with a broad operator, so many labels occur
    assert len(labels) >= 6
