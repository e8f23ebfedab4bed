"""Character-level tinyshakespeare (Karpathy's char-rnn corpus): next-character LM."""

from __future__ import annotations

import math
import os

import torch

from formerlab.data.base import Batch, Task
from formerlab.data.paths import find_data_file, verify_file
from formerlab.data.registry import register
from formerlab.errors import check_choice, check_positive_int

FILE = "tinyshakespeare.txt"
SIZE = 1_115_394
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class ShakespeareChars(Task):
    """Random windows of ``context`` characters; first 90% train, last 10% val."""

    name = "shakespeare_chars"
    kind = "decoder"
    main_metric = "loss"
    higher_is_better = False

    def __init__(
        self, context: int = 128, data_path: str | os.PathLike | None = None, verify: bool = True
    ) -> None:
        self.context = check_positive_int("context", context, minimum=2)
        self.max_len = context
        path = find_data_file(FILE, data_path)
        if verify:
            verify_file(path, SIZE, SHA256)
        text = path.read_text(encoding="utf-8")
        self.vocab = sorted(set(text))
        self._index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor(self.encode(text), dtype=torch.int64)
        cut = int(0.9 * len(ids))
        self._splits = {"train": ids[:cut], "val": ids[cut:]}

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self._index))
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary: {unknown}")
        return [self._index[c] for c in text]

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        data = self._splits[check_choice("split", split, self._splits)]
        starts = torch.randint(0, len(data) - self.context - 1, (batch_size,), generator=generator)
        windows = torch.stack([data[s : s + self.context + 1] for s in starts.tolist()])
        return Batch(windows[:, :-1], windows[:, 1:])

    def baseline(self) -> dict[str, float]:
        return {"loss": math.log(self.vocab_size), "accuracy": 1.0 / self.vocab_size}


@register("shakespeare_chars", description="char-level tinyshakespeare LM (decoder)")
def _build(context: int = 128, data_path: str | None = None) -> ShakespeareChars:
    return ShakespeareChars(context=context, data_path=data_path)
