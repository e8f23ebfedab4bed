"""Where task data is found: an explicit path, else ``$FORMERLAB_DATA``, else defaults."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DATA_ENV = "FORMERLAB_DATA"
DEFAULT_DIRS = ("data", "../shared/data")


def candidate_paths(relative: str, path: str | os.PathLike | None) -> list[Path]:
    """The places looked at for ``relative`` (a file inside a data directory), in order.

    ``path`` may name the file itself or a data directory holding it.
    """
    if path is not None:
        p = Path(path).expanduser()
        return [p / relative if p.is_dir() else p]
    dirs = [os.environ[DATA_ENV]] if os.environ.get(DATA_ENV) else list(DEFAULT_DIRS)
    return [Path(d).expanduser() / relative for d in dirs]


def find_data_file(relative: str, path: str | os.PathLike | None = None) -> Path:
    """The first existing candidate for ``relative``; else ``FileNotFoundError`` naming
    every place tried and how to point formerlab at the data."""
    tried = candidate_paths(relative, path)
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{relative} not found; looked at {[str(p) for p in tried]}. Pass the file or its "
        f"data directory (option data_path; config key task.options.data_path) or set "
        f"{DATA_ENV}=DIR."
    )


def verify_file(path: Path, size: int, sha256: str) -> None:
    """Raise ``ValueError`` naming the file, the expected and the found size/checksum."""
    found = path.stat().st_size
    if found != size:
        raise ValueError(f"{path}: expected {size:,} bytes, found {found:,} (wrong or damaged file)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: expected sha256 {sha256}, found {digest} (wrong or damaged file)")
