"""A sweep folder on disk: its file names, the status names of a trial result, and reading
and writing those files.

The bottom of ``experiments/``: ``sweep`` (which plans trials and hands them to a backend),
``backends`` (which run them), ``trial`` (one run) and ``report`` all read and write the
same files, so the names and the two helpers live here and this module imports nothing
from formerlab. Layout::

    SWEEP_DIR/sweep.json                       SWEEP_FILE: the spec and the trial list
    SWEEP_DIR/trials/<label>-<hash>/           TRIALS_DIR: one folder per trial
    SWEEP_DIR/trials/<label>-<hash>/result.json  RESULT_FILE: the trial's result dict

A result's ``status`` is ``COMPLETED`` or ``FAILED``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SWEEP_FILE = "sweep.json"
RESULT_FILE = "result.json"
TRIALS_DIR = "trials"
COMPLETED, FAILED = "completed", "failed"


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def read_result(trial_dir: Path) -> dict[str, Any] | None:
    """The ``result.json`` of a trial folder, or None when it has none (or a broken one)."""
    path = Path(trial_dir) / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
