"""SST-2: both splits load with the GLUE counts, the vocabulary comes from train only,
evaluation walks the whole dev set, errors name the file they looked for."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from formerlab import data
from formerlab.data.paths import find_data_file
from formerlab.data.sst2 import PAD_ID, SST2, UNK_ID


def read_rows(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(int(line.split("\t")[0]), line.split("\t")[1]) for line in lines]


@pytest.fixture(scope="module")
def files() -> dict[str, list[tuple[int, str]]]:
    return {
        "train": read_rows(find_data_file("sst2/train.tsv")),
        "val": read_rows(find_data_file("sst2/dev.tsv")),
    }


@pytest.fixture(scope="module")
def words() -> SST2:
    return data.build("sst2")


def test_both_splits_load_with_glue_counts(words: SST2, files) -> None:
    assert words.size("train") == len(files["train"]) == 67_349
    assert words.size("val") == len(files["val"]) == 872
    assert words.kind == "encoder" and words.num_classes == 2


def test_vocabulary_comes_from_train_only(words: SST2, files) -> None:
    train_tokens = {t for _, text in files["train"] for t in text.split()}
    dev_tokens = {t for _, text in files["val"] for t in text.split()}
    assert set(words.vocab[2:]) == train_tokens and words.vocab[:2] == ["<pad>", "<unk>"]
    unseen = sorted(dev_tokens - train_tokens)
    assert unseen, "the GLUE dev set has words the train set lacks"
    assert words.encode(" ".join(unseen[:20])) == [UNK_ID] * min(20, len(unseen))
    counts = Counter(t for _, text in files["train"] for t in text.split())
    assert words.vocab[2] == counts.most_common(1)[0][0]  # ids ordered by frequency


def test_eval_walks_the_whole_dev_set_in_order(words: SST2, files) -> None:
    batches = list(words.eval_batches("val", 100, max_batches=1))
    labels = torch.cat([b.targets for b in batches]).tolist()
    assert labels == [label for label, _ in files["val"]]
    first = batches[0]
    for row, mask, (_, text) in zip(first.inputs, first.attention_mask, files["val"][:100]):
        n = int(mask.sum())
        assert row[:n].tolist() == words.encode(text)
        assert (row[n:] == PAD_ID).all() and not mask[n:].any()
    assert words.max_len >= max(int(b.attention_mask.sum(1).max()) for b in batches)


def test_majority_baseline(words: SST2, files) -> None:
    train = Counter(label for label, _ in files["train"])
    majority = train.most_common(1)[0][0]
    dev = [label for label, _ in files["val"]]
    assert words.baseline()["accuracy"] == pytest.approx(dev.count(majority) / len(dev))
    assert majority == 1 and words.baseline()["accuracy"] == pytest.approx(444 / 872)


def test_char_level_and_truncation(files) -> None:
    chars = SST2(level="char", max_len=40)
    assert set(chars.vocab[2:]) == {c for _, text in files["train"] for c in text}
    assert chars.max_len == 40
    b = chars.batch("train", 64, torch.Generator().manual_seed(0))
    assert int(b.attention_mask.sum(1).max()) <= 40
    assert chars.decode(chars.encode("a good film")) == "a good film"
    long = next(t for _, t in files["val"] if len(t) > 40)
    index = [t for _, t in files["val"]].index(long)
    row = torch.cat([x.inputs for x in chars.eval_batches("val", 872, 1)])[index]
    assert chars.decode(row.tolist()) == long[:40]


def test_data_path_may_be_the_sst2_directory() -> None:
    directory = find_data_file("sst2/train.tsv").parent
    task = SST2(data_path=directory)
    assert task.size("val") == 872


def test_missing_file_error_names_the_path_tried(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.build("sst2", data_path=str(tmp_path))
    assert str(tmp_path / "sst2" / "train.tsv") in str(info.value)


def test_damaged_file_is_rejected(tmp_path: Path) -> None:
    source = find_data_file("sst2/train.tsv").parent
    shutil.copytree(source, tmp_path / "sst2")
    dev = tmp_path / "sst2" / "dev.tsv"
    dev.chmod(0o644)
    dev.write_text(dev.read_text().replace("label\tcontent", "label\tcontenX", 1))
    with pytest.raises(ValueError, match="dev.tsv: expected sha256"):
        SST2(data_path=tmp_path)  # same size, so it is the checksum that catches it
    with pytest.raises(ValueError, match="'content'"):
        SST2(data_path=tmp_path, verify=False)  # the header is checked on its own too


def test_bad_options_name_the_argument() -> None:
    with pytest.raises(ValueError, match="level"):
        data.build("sst2", level="byte")
    with pytest.raises(ValueError, match="max_len"):
        data.build("sst2", max_len=0)
