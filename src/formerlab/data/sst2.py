"""SST-2: binary sentiment of movie-review sentences (Socher et al., 2013; GLUE, Wang et al., 2019).

Read from ``sst2/train.tsv`` (67,349 sentences, header ``label<TAB>sentence``) and
``sst2/dev.tsv`` (872, header ``label<TAB>content``) under a data directory. The text is
already tokenised and lower-cased by GLUE; tokens are characters or whitespace-separated
words, and the vocabulary is built from the training split only, so the dev set is
encoded the way unseen text would be (unknown tokens -> ``<unk>``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from formerlab.data._common import Ragged
from formerlab.data.base import Batch, Task
from formerlab.data.paths import find_data_file, verify_file
from formerlab.data.registry import register
from formerlab.errors import check_choice, check_positive_int

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
LEVELS = ("word", "char")
# file -> (expected rows, bytes, sha256, text column); the two GLUE files name it differently
FILES = {
    "train": ("sst2/train.tsv", 67_349, 3_806_081,
              "e981ceb4fe6c9acd1c79851d0d091b9e78103f1f2a399ca83dda27915d41c56c", "sentence"),
    "val": ("sst2/dev.tsv", 872, 94_414,
            "84207e6be5873fb18db798cc6faec86871f5a426554650ff64a1c34e87665f6f", "content"),
}


def find_sst2_file(split: str, data_path: str | os.PathLike | None) -> Path:
    """The TSV of ``split`` ("train" or "val" = GLUE dev). ``data_path`` may be a data
    directory holding ``sst2/`` or the ``sst2`` directory itself; default: ``$FORMERLAB_DATA``
    or the standard places (see ``formerlab.data.paths``)."""
    relative = FILES[check_choice("split", split, FILES)][0]
    if data_path is not None:
        root = Path(data_path).expanduser()
        if root.is_file():
            raise ValueError(
                f"data_path={str(data_path)!r} (config key task.options.data_path) is not "
                "allowed: SST-2 has two files; expected a data directory holding sst2/ or the "
                "sst2 directory itself"
            )
        if (root / Path(relative).name).is_file():  # pointed at the sst2 directory
            return root / Path(relative).name
    return find_data_file(relative, data_path)


def read_tsv(path: Path, text_column: str) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of a GLUE SST-2 file; errors name the file and line."""
    with path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if "label" not in header or text_column not in header:
            raise ValueError(
                f"{path}: header {header} lacks 'label' or {text_column!r}; is this SST-2?"
            )
        label_at, text_at = header.index("label"), header.index(text_column)
        texts, labels = [], []
        for number, line in enumerate(f, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != len(header) or fields[label_at] not in ("0", "1"):
                raise ValueError(f"{path}:{number}: expected {len(header)} fields, label 0/1")
            texts.append(fields[text_at])
            labels.append(int(fields[label_at]))
    return texts, labels


class SST2(Task):
    """Sentence -> 0 (negative) / 1 (positive); an encoder task with padding masks.

    Options: ``level`` ("word" or "char"), ``min_freq`` (train count a token needs to get
    its own id, else ``<unk>``), ``max_len`` (truncate longer sentences; default: the
    longest sentence of either split, so nothing is cut), ``data_path``.
    Evaluation (split "val") walks the whole dev set in order. Baseline: always predict
    the training majority class (positive), scored on dev: accuracy 50.9%.
    """

    name = "sst2"
    kind = "encoder"
    num_classes = 2
    main_metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        level: str = "word",
        min_freq: int = 1,
        max_len: int | None = None,
        data_path: str | os.PathLike | None = None,
        verify: bool = True,
    ) -> None:
        self.level = check_choice("level", level, LEVELS)
        self.min_freq = check_positive_int("min_freq", min_freq)
        if max_len is not None:
            check_positive_int("max_len", max_len)
        data: dict[str, tuple[list[str], list[int]]] = {}
        for split, (_, rows, size, sha256, column) in FILES.items():
            path = find_sst2_file(split, data_path)
            if verify:
                verify_file(path, size, sha256)
            data[split] = read_tsv(path, column)
            if verify and len(data[split][0]) != rows:
                raise ValueError(f"{path}: expected {rows:,} sentences, found {len(data[split][0]):,}")
        counts = Counter(t for text in data["train"][0] for t in self.tokenize(text))
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        self.vocab = [PAD, UNK, *kept]
        self._index = {t: i for i, t in enumerate(self.vocab)}
        self._data: dict[str, tuple[Ragged, torch.Tensor]] = {}
        for split, (texts, labels) in data.items():
            # an empty sentence still needs one position for the encoder to pool over
            ids = [self.encode(text)[:max_len] or [UNK_ID] for text in texts]
            self._data[split] = (Ragged(ids), torch.tensor(labels))
        longest = max(int(r.lengths.max()) for r, _ in self._data.values())
        self.max_len = longest if max_len is None else min(max_len, longest)

    def tokenize(self, text: str) -> list[str]:
        return text.split() if self.level == "word" else list(text)

    def encode(self, text: str) -> list[int]:
        """Text -> ids with the training vocabulary; unseen tokens become ``<unk>``."""
        return [self._index.get(t, UNK_ID) for t in self.tokenize(text)]

    def decode(self, ids: list[int]) -> str:
        tokens = [self.vocab[i] for i in ids if i != PAD_ID]
        return " ".join(tokens) if self.level == "word" else "".join(tokens)

    def size(self, split: str) -> int:
        """Number of sentences in ``split``."""
        return len(self._data[check_choice("split", split, FILES)][1])

    def _batch_of(self, split: str, index: torch.Tensor) -> Batch:
        ragged, labels = self._data[split]
        inputs, mask = ragged.pad(index, PAD_ID)
        return Batch(inputs, labels[index], mask)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        check_positive_int("batch_size", batch_size)
        index = torch.randint(0, self.size(split), (batch_size,), generator=generator)
        return self._batch_of(split, index)

    def eval_batches(
        self, split: str, batch_size: int, max_batches: int, seed: int = 0
    ) -> Iterator[Batch]:
        """Split "val": the whole dev set in order (``max_batches`` and ``seed`` unused, so
        scores are comparable with published SST-2 dev accuracy); "train": as in ``Task``."""
        if split != "val":
            yield from super().eval_batches(split, batch_size, max_batches, seed)
            return
        check_positive_int("batch_size", batch_size)
        size = self.size("val")
        for start in range(0, size, batch_size):
            yield self._batch_of("val", torch.arange(start, min(start + batch_size, size)))

    def baseline(self) -> dict[str, float]:
        train = torch.bincount(self._data["train"][1], minlength=2).double()
        val = torch.bincount(self._data["val"][1], minlength=2).double()
        prior = train / train.sum()
        return {
            "loss": float(-(val * prior.log()).sum() / val.sum()),
            "accuracy": float(val[int(train.argmax())] / val.sum()),
        }


@register("sst2", description="SST-2 binary sentiment, word or char tokens (encoder, 2 classes)")
def _build(
    level: str = "word",
    min_freq: int = 1,
    max_len: int | None = None,
    data_path: str | None = None,
) -> SST2:
    return SST2(level=level, min_freq=min_freq, max_len=max_len, data_path=data_path)
