"""The best validation checkpoint and the test score taken at it (``train.test_at_best``).

Long Range Arena's protocol: evaluate on the validation split during training, keep the
weights of the best evaluation, and score the test split once, with those weights, at the
end. ``RUN_DIR/best/`` holds ``model.safetensors`` and ``best.json`` (step and validation
scores); ``RUN_DIR/test.json`` holds the test scores and the step they come from.
A save writes ``best.tmp/`` completely, then renames it into place, so ``best/`` is always
a complete pair.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from formerlab.data import Task

BEST_DIR = "best"
TEST_FILE = "test.json"


def check_test_split(task: Task) -> None:
    """``train.test_at_best`` needs a task with a ``"test"`` split."""
    if "test" not in task.splits:
        raise ValueError(
            f"train.test_at_best=true needs a task with a test split; task {task.name!r} has "
            f"splits {list(task.splits)} (ListOps: set task.options.test_size)"
        )


def improves(task: Task, scores: dict[str, float], best: dict[str, Any] | None) -> bool:
    """Whether ``scores`` beat ``best`` on the task's main metric (ties keep the earlier)."""
    if best is None:
        return True
    new, old = scores[task.main_metric], best["val"][task.main_metric]
    return new > old if task.higher_is_better else new < old


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """``{"step", "val"}`` of the best evaluation saved in ``run_dir``, or None."""
    path = Path(run_dir) / BEST_DIR / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_best(run_dir: str | Path, model: nn.Module, step: int, scores: dict[str, float]) -> None:
    """Keep ``model``'s weights as the best evaluation (at ``step``, with ``scores``)."""
    run_dir = Path(run_dir)
    tmp, final = run_dir / f"{BEST_DIR}.tmp", run_dir / BEST_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "best.json").write_text(json.dumps({"step": step, "val": scores}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def best_weights(run_dir: str | Path) -> Path:
    """The weights file of the best evaluation."""
    path = Path(run_dir) / BEST_DIR / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run evaluated nothing yet")
    return path


def write_test(run_dir: str | Path, best: dict[str, Any], test: dict[str, float]) -> dict[str, Any]:
    """Write and return ``{"best_step", "val", "test"}`` as ``RUN_DIR/test.json``."""
    record = {"best_step": best["step"], "val": best["val"], "test": test}
    (Path(run_dir) / TEST_FILE).write_text(json.dumps(record, indent=1))
    return record
