"""ListOps (Nangia & Bowman, 2018), generated as in Long Range Arena (Tay et al., 2021).

Expressions nest the operators MAX, MIN, MED (median, rounded down) and SM (sum modulo 10)
over the digits 0-9, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9. The label (0-9) is the value
of the whole expression; a model must parse the hierarchy to get it, which is what makes
ListOps LRA's long-range reasoning task. The LRA setting is ``max_depth=10, max_args=10,
min_len=500, max_len=2000`` (96k train / 2k val examples).

Every generated label is checked by ``evaluate``, a separate stack-based reference
evaluator over the token sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import torch

from formerlab.data._common import Ragged
from formerlab.data.base import Batch, PooledSplits, Task
from formerlab.data.registry import register
from formerlab.errors import check_choice, check_positive_float, check_positive_int

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
PAD = "<pad>"
DIGITS = tuple(str(d) for d in range(10))
VOCAB = [PAD, *DIGITS, *OPERATORS, CLOSE]
PAD_ID = 0
_DIGIT_IDS = tuple(range(1, 11))
_OPERATOR_IDS = tuple(range(11, 15))
_CLOSE_ID = 15
_CACHE_VERSION = 1
_SPLIT_SEEDS = {"train": "train", "val": "val", "test": "test"}


# --- reference evaluator -------------------------------------------------------------

_REFERENCE = {
    "[MAX": max,
    "[MIN": min,
    "[MED": lambda args: int(statistics.median(args)),  # LRA: int(np.median(args))
    "[SM": lambda args: sum(args) % 10,
}


def evaluate(expression: str | Sequence[str]) -> int:
    """Value of a ListOps expression given as text or tokens; round brackets are ignored.

    Stack-based and independent of the generator. Raises ``ValueError`` on a malformed
    expression (unknown token, unbalanced ``]``, an operator with no arguments, or more
    than one top-level expression).
    """
    tokens = expression.split() if isinstance(expression, str) else list(expression)
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for position, token in enumerate(tokens):
        if token in ("(", ")"):
            continue
        if token in _REFERENCE:
            stack.append((token, []))
            continue
        if token == CLOSE:
            if not stack:
                raise ValueError(f"unbalanced {CLOSE!r} at token {position} of {expression!r}")
            operator, args = stack.pop()
            if not args:
                raise ValueError(f"{operator} without arguments at token {position}")
            value = _REFERENCE[operator](args)
        elif token in DIGITS:
            value = int(token)
        else:
            raise ValueError(
                f"unknown ListOps token {token!r} at {position}; expected one of {VOCAB[1:]}"
            )
        if stack:
            stack[-1][1].append(value)
        elif result is None:
            result = value
        else:
            raise ValueError(f"more than one top-level expression in {expression!r}")
    if stack or result is None:
        raise ValueError(f"incomplete ListOps expression {expression!r}")
    return result


# --- generator -----------------------------------------------------------------------


class _TooLong(Exception):
    """Raised to abandon a tree as soon as it exceeds the length limit."""


def _apply(operator_id: int, args: list[int]) -> int:
    if operator_id == 11:
        return max(args)
    if operator_id == 12:
        return min(args)
    if operator_id == 13:
        ordered = sorted(args)
        middle = len(ordered) // 2
        return (ordered[middle - 1] + ordered[middle]) // 2 if len(ordered) % 2 == 0 else ordered[middle]
    return sum(args) % 10


def _tree(rng: random.Random, depth: int, cfg: ListOpsConfig, out: list[int]) -> int:
    """Append one random (sub)tree's token ids to ``out``; return its value.

    As in LRA's generator: a node at ``depth < max_depth`` (the root has depth 1) is an
    operator with probability ``operator_prob``, with 2..``max_args`` children; otherwise
    it is a digit.
    """
    if depth < cfg.max_depth and rng.random() < cfg.operator_prob:
        operator_id = rng.choice(_OPERATOR_IDS)
        out.append(operator_id)
        args = [_tree(rng, depth + 1, cfg, out) for _ in range(rng.randint(2, cfg.max_args))]
        out.append(_CLOSE_ID)
        value = _apply(operator_id, args)
    else:
        value = rng.randrange(10)
        out.append(_DIGIT_IDS[value])
    if len(out) > cfg.max_len:
        raise _TooLong
    return value


class ListOpsConfig:
    """The generation options of a ListOps task (validated)."""

    def __init__(
        self,
        min_len: int,
        max_len: int,
        max_depth: int,
        max_args: int,
        operator_prob: float,
        train_size: int,
        val_size: int,
        seed: int,
        test_size: int = 0,
    ) -> None:
        self.max_depth = check_positive_int("max_depth", max_depth, minimum=2)
        self.max_args = check_positive_int("max_args", max_args, minimum=2)
        self.operator_prob = check_positive_float("operator_prob", operator_prob)
        if self.operator_prob >= 1:
            raise ValueError(f"operator_prob={operator_prob!r} is not allowed; expected 0 < p < 1")
        self.min_len = check_positive_int("min_len", min_len, minimum=1)
        self.max_len = check_positive_int("max_len", max_len, minimum=1)
        if min_len > max_len:
            raise ValueError(
                f"min_len={min_len!r} is larger than max_len={max_len!r} (config keys "
                "task.options.min_len and task.options.max_len); expected min_len <= max_len"
            )
        longest = longest_expression(max_depth, max_args)
        if min_len > longest:
            raise ValueError(
                f"min_len={min_len!r} (config key task.options.min_len) is not allowed: with "
                f"max_depth={max_depth} and max_args={max_args} expressions have at most "
                f"{longest} tokens"
            )
        self.train_size = check_positive_int("train_size", train_size)
        self.val_size = check_positive_int("val_size", val_size)
        if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 0:
            raise ValueError(f"test_size={test_size!r} is not allowed; expected an integer >= 0 "
                             "(0: no test split)")
        self.test_size = test_size
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is not allowed; expected an integer")
        self.seed = seed

    def as_dict(self) -> dict[str, float | int]:
        options = dict(vars(self))
        if not options["test_size"]:  # so caches written before test splits stay valid
            del options["test_size"]
        return options


def longest_expression(max_depth: int, max_args: int) -> int:
    """Token count of the largest tree: every node above the last level has max_args children."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def generate(
    cfg: ListOpsConfig, count: int, split: str, exclude: Collection[bytes] = frozenset()
) -> tuple[list[bytes], list[int]]:
    """``count`` distinct expressions with ``min_len <= length <= max_len`` and their labels,
    deterministic given ``cfg.seed`` and ``split``; skips those in ``exclude``. Each
    expression is its token ids as ``bytes`` (compact: LRA-sized pools are ~10^8 tokens).

    Rejection sampling on length as in LRA; a tree is abandoned as soon as it grows past
    ``max_len``. Every label is re-checked by the reference ``evaluate``.
    """
    rng = random.Random(f"listops:{cfg.seed}:{_SPLIT_SEEDS[split]}")  # str seeds are stable
    seen: set[bytes] = set()
    sequences: list[bytes] = []
    labels: list[int] = []
    attempts, limit = 0, 20_000 + 5_000 * count
    while len(sequences) < count:
        attempts += 1
        if attempts > limit:
            raise ValueError(
                f"generated only {len(sequences)} of {count} distinct ListOps {split} examples "
                f"in {limit} attempts with {cfg.as_dict()}; widen min_len..max_len or raise "
                f"max_depth/max_args"
            )
        out: list[int] = []
        try:
            label = _tree(rng, 1, cfg, out)
        except _TooLong:
            continue
        if len(out) < cfg.min_len:
            continue
        key = bytes(out)
        if key in seen or key in exclude:
            continue
        expected = evaluate([VOCAB[i] for i in out])
        if expected != label:  # a generator bug, never a user error
            raise RuntimeError(f"ListOps generator gave {label}, reference says {expected}")
        seen.add(key)
        sequences.append(key)
        labels.append(label)
    return sequences, labels


# --- task ----------------------------------------------------------------------------

_POOLS: dict[str, dict[str, tuple[Ragged, torch.Tensor]]] = {}  # per-process cache


def _ragged(sequences: list[bytes]) -> Ragged:
    flat = torch.frombuffer(bytearray(b"".join(sequences)), dtype=torch.uint8)
    return Ragged.from_flat(flat, torch.tensor([len(s) for s in sequences]))


@register("listops", description="LRA ListOps: nested MAX/MIN/MED/SM expressions (encoder, 10 classes)")
class ListOps(PooledSplits, Task):
    """LRA ListOps as an encoder task: 10 classes, inputs padded per batch with a mask.

    Fixed pools of ``train_size`` / ``val_size`` (/ ``test_size``) distinct expressions are
    generated on first use (pure Python; cached per process and, with ``cache_dir``, on
    disk); the pools are disjoint. ``test_size > 0`` adds the ``"test"`` split (LRA: 2k). Training batches sample the train pool with the
    caller's generator; evaluation walks the val pool in order.

    Baseline: the majority class of the train pool, scored on val (``accuracy``), and
    the cross-entropy on val of the train label frequencies (``loss``). MAX leans to 9 and
    MIN to 0, so labels are not quite uniform and this sits a little above 10%
    (about 13% with the defaults, 17% in the LRA setting).
    """

    name = "listops"
    kind = "encoder"
    num_classes = 10
    main_metric = "accuracy"
    higher_is_better = True
    vocab = VOCAB

    def __init__(
        self,
        min_len: int = 32,
        max_len: int = 128,
        max_depth: int = 5,
        max_args: int = 5,
        operator_prob: float = 0.25,
        train_size: int = 20_000,
        val_size: int = 1_000,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        test_size: int = 0,
    ) -> None:
        self.config = ListOpsConfig(
            min_len, max_len, max_depth, max_args, operator_prob, train_size, val_size, seed,
            test_size,
        )
        self.splits = ("train", "val", "test") if test_size else ("train", "val")
        self.max_len = max_len
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self._key = hashlib.sha256(
            json.dumps({"v": _CACHE_VERSION, **self.config.as_dict()}, sort_keys=True).encode()
        ).hexdigest()[:16]

    # pools

    def _cache_file(self) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"listops-{self._key}.safetensors"

    def _pools(self) -> dict[str, tuple[Ragged, torch.Tensor]]:
        if self._key in _POOLS:
            return _POOLS[self._key]
        pools = self._load() or self._generate()
        _POOLS[self._key] = pools
        return pools

    def _generate(self) -> dict[str, tuple[Ragged, torch.Tensor]]:
        cfg = self.config
        train, train_labels = generate(cfg, cfg.train_size, "train")
        val, val_labels = generate(cfg, cfg.val_size, "val", exclude=set(train))
        pools = {
            "train": (_ragged(train), torch.tensor(train_labels)),
            "val": (_ragged(val), torch.tensor(val_labels)),
        }
        if cfg.test_size:
            test, test_labels = generate(cfg, cfg.test_size, "test", exclude={*train, *val})
            pools["test"] = (_ragged(test), torch.tensor(test_labels))
        path = self._cache_file()
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {}
            for split, (ragged, labels) in pools.items():
                tensors.update({
                    f"{split}.flat": ragged.flat, f"{split}.lengths": ragged.lengths,
                    f"{split}.labels": labels,
                })
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"config": json.dumps(cfg.as_dict())})
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        return pools

    def _load(self) -> dict[str, tuple[Ragged, torch.Tensor]] | None:
        path = self._cache_file()
        if path is None or not path.is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(str(path))
        return {
            split: (Ragged.from_flat(t[f"{split}.flat"], t[f"{split}.lengths"]), t[f"{split}.labels"])
            for split in self.splits
        }

    def examples(self, split: str) -> Iterator[tuple[list[int], int]]:
        """All ``(token ids, label)`` of a split's pool, in order."""
        ragged, labels = self._pools()[check_choice("split", split, self.splits)]
        for i in range(len(ragged)):
            yield ragged.get(i), int(labels[i])

    # Task interface

    def _batch_of(self, split: str, index: torch.Tensor) -> Batch:
        ragged, labels = self._pools()[split]
        inputs, mask = ragged.pad(index, PAD_ID)
        return Batch(inputs, labels[index].long(), mask)

    def pool_size(self, split: str) -> int:
        return len(self._pools()[split][1])

    def baseline(self) -> dict[str, float]:
        train = torch.bincount(self._pools()["train"][1], minlength=10).double()
        val = torch.bincount(self._pools()["val"][1], minlength=10).double()
        prior = (train + 1) / (train.sum() + 10)  # add-one: a class unseen in train is not -inf
        return {
            "loss": float(-(val * prior.log()).sum() / val.sum()),
            "accuracy": float(val[int(train.argmax())] / val.sum()),
        }

    def encode(self, text: str) -> list[int]:
        """``"[MAX 2 9 ]"`` -> token ids (round brackets dropped)."""
        ids = []
        for token in text.split():
            if token in ("(", ")"):
                continue
            ids.append(VOCAB.index(check_choice("token", token, VOCAB[1:])))
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(VOCAB[i] for i in ids if i != PAD_ID)
