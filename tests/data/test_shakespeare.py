"""tinyshakespeare loader: errors name the file and what was expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from formerlab import data
from formerlab.data.paths import find_data_file
from formerlab.data.shakespeare import SHA256, SIZE, ShakespeareChars


def test_missing_file_names_the_path_tried(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.build("shakespeare_chars", data_path=str(tmp_path))
    assert str(tmp_path / "tinyshakespeare.txt") in str(info.value)


def test_missing_file_via_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FORMERLAB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="FORMERLAB_DATA") as info:
        ShakespeareChars()
    assert str(tmp_path / "tinyshakespeare.txt") in str(info.value)


def test_one_changed_byte_fails_the_checksum(tmp_path: Path) -> None:
    copy = tmp_path / "tinyshakespeare.txt"
    shutil.copyfile(find_data_file("tinyshakespeare.txt"), copy)
    raw = bytearray(copy.read_bytes())
    raw[1000] = ord("X") if raw[1000] != ord("X") else ord("Y")
    copy.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as info:
        ShakespeareChars(data_path=tmp_path)
    message = str(info.value)
    assert str(copy) in message and SHA256 in message


def test_wrong_size_names_expected_size(tmp_path: Path) -> None:
    copy = tmp_path / "tiny.txt"
    copy.write_bytes(find_data_file("tinyshakespeare.txt").read_bytes()[:-1])
    with pytest.raises(ValueError) as info:
        ShakespeareChars(data_path=copy)
    assert str(copy) in str(info.value) and f"{SIZE:,}" in str(info.value)


def test_loads_and_windows_follow_the_text() -> None:
    task = ShakespeareChars(context=32)
    text = find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    assert task.vocab == sorted(set(text))
    b = task.batch("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])  # next-character targets
    assert task.decode(b.inputs[0].tolist()) in text
