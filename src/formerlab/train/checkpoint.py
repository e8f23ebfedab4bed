"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout of ``RUN_DIR/checkpoint/``:

* ``model.safetensors``   model weights (tied weights stored once),
* ``trainer.safetensors`` optimizer state tensors and the RNG states (torch + data),
* ``state.json``          step, the full config, optimizer hyper-parameters, history.

Crash safety. A save writes ``checkpoint.tmp/`` completely (every file fsynced; ``state.json``
last, itself written to a side file and renamed, so a folder *with* ``state.json`` is a
complete checkpoint), then moves ``checkpoint`` to ``checkpoint.old``, ``checkpoint.tmp`` to
``checkpoint`` and deletes ``checkpoint.old`` (each rename fsynced in the run folder). A crash
at any point leaves at least one complete folder: readers take the first complete one of
``checkpoint``, ``checkpoint.tmp``, ``checkpoint.old`` (``resolve_checkpoint``), and the next
save or resume first puts it back in place (``recover_checkpoint``).

Damaged files (empty or non-JSON ``state.json``, a wrong-typed field, a truncated
safetensors file, weights that do not fit the stored config) raise ``CheckpointError``:
one line naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from formerlab.data import Task
from formerlab.train.build import build_model, build_task
from formerlab.train.config import ConfigError, RunConfig, validate_config

CHECKPOINT_DIR = "checkpoint"
TMP_DIR = CHECKPOINT_DIR + ".tmp"
OLD_DIR = CHECKPOINT_DIR + ".old"
STATE_FILE = "state.json"
DAMAGED_HINT = "the checkpoint is damaged: restore the file, or delete the run folder and train again"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: which file, what is wrong, what to do."""


def _crash_point(name: str) -> None:
    """No-op; tests replace it to simulate a crash at each stage of ``save_checkpoint``."""


@dataclass
class TrainerState:
    """What a resumed run needs besides the weights."""

    step: int
    history: list[dict[str, Any]]
    torch_rng: torch.Tensor
    data_rng: torch.Tensor


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split the optimizer state into tensors (for safetensors) and plain JSON values."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk (folders: so that renames survive a crash)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def _is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def save_checkpoint(
    run_dir: Path,
    cfg: RunConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
) -> Path:
    """Write the checkpoint of ``run_dir`` crash-safely (see the module docstring)."""
    run_dir = Path(run_dir)
    recover_checkpoint(run_dir)  # a crashed save's only complete copy may be .tmp or .old
    final, tmp, old = run_dir / CHECKPOINT_DIR, run_dir / TMP_DIR, run_dir / OLD_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors, optim_json = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = state.torch_rng
    tensors["rng.data"] = state.data_rng
    save_file(tensors, str(tmp / "trainer.safetensors"))
    _fsync(tmp / "model.safetensors")
    _fsync(tmp / "trainer.safetensors")
    _crash_point("tensors-written")
    meta = {
        "step": state.step,
        "config": cfg.model_dump(mode="json"),
        "optimizer": optim_json,
        "history": state.history,
    }
    part = tmp / (STATE_FILE + ".part")
    part.write_text(json.dumps(meta, indent=1))
    _fsync(part)
    part.rename(tmp / STATE_FILE)  # from here on .tmp is a complete checkpoint
    _fsync(tmp)
    _crash_point("tmp-complete")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
        _fsync(run_dir)
    _crash_point("old-moved")
    tmp.rename(final)
    _fsync(run_dir)
    _crash_point("new-in-place")
    shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint folder of ``run_dir`` (``checkpoint``, else the ``.tmp`` or
    ``.old`` copy a crashed save left), or None. Changes nothing on disk."""
    for name in (CHECKPOINT_DIR, TMP_DIR, OLD_DIR):
        if _is_complete(Path(run_dir) / name):
            return Path(run_dir) / name
    return None


def recover_checkpoint(run_dir: str | Path) -> Path | None:
    """Put the complete copy a crashed save left back at ``checkpoint/`` and drop the rest."""
    run_dir = Path(run_dir)
    found = resolve_checkpoint(run_dir)
    final = run_dir / CHECKPOINT_DIR
    if found is not None and found != final:
        shutil.rmtree(final, ignore_errors=True)
        found.rename(final)
        _fsync(run_dir)
    if found is not None:
        for name in (TMP_DIR, OLD_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        return final
    return None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a complete checkpoint (possibly one a crashed save left)."""
    return resolve_checkpoint(run_dir) is not None


def checkpoint_folder(run_dir: str | Path) -> Path:
    """The checkpoint folder of ``run_dir``; ``FileNotFoundError`` if there is none."""
    folder = resolve_checkpoint(run_dir)
    if folder is None:
        expected = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
        raise FileNotFoundError(
            f"no checkpoint in {str(run_dir)!r} (expected {str(expected)!r}); "
            "pass the folder of a run made by `formerlab train`"
        )
    return folder


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: state.json fields: (check, what the field must be)
_STATE_FIELDS = {
    "step": (_non_negative_int, "a non-negative integer"),
    "config": (lambda v: isinstance(v, dict), "a mapping (the run config)"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list)
                  and isinstance(v.get("plain_state"), dict),
                  "a mapping with 'param_groups' (a list) and 'plain_state' (a mapping)"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
                "a list of mappings"),
}


def read_state(folder: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint folder, checked field by field (``CheckpointError``)."""
    path = Path(folder) / STATE_FILE
    try:
        text = path.read_text()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror}); {DAMAGED_HINT}") from None
    if not text.strip():
        raise CheckpointError(f"{path}: the file is empty; {DAMAGED_HINT}")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"{DAMAGED_HINT}"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}; {DAMAGED_HINT}")
    for name, (check, expected) in _STATE_FIELDS.items():
        if name not in meta:
            raise CheckpointError(f"{path}: the field {name!r} is missing; {DAMAGED_HINT}")
        if not check(meta[name]):
            raise CheckpointError(
                f"{path}: the field {name!r} must be {expected}, got {_short(meta[name])}; {DAMAGED_HINT}"
            )
    return meta


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _config_of(folder: Path, meta: dict[str, Any]) -> RunConfig:
    try:
        return validate_config(meta["config"])
    except ConfigError as error:
        problem = " ".join(str(error).split())
        raise CheckpointError(f"{folder / STATE_FILE}: the stored config is not valid ({problem}); "
                              f"{DAMAGED_HINT}") from None


def read_config(run_dir: str | Path) -> RunConfig:
    """The validated config stored with a run's checkpoint."""
    folder = checkpoint_folder(run_dir)
    return _config_of(folder, read_state(folder))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(error)}); "
                              f"{DAMAGED_HINT}") from None


def _reason(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def load_weights(model: nn.Module, path: Path, cfg: RunConfig, device: str = "cpu") -> None:
    """Load ``model.safetensors`` into ``model``; a damaged file or weights of another shape
    than ``cfg`` builds raise one-line ``CheckpointError`` (not a per-tensor dump)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(error)}); "
                              f"{DAMAGED_HINT}") from None
    expected = {key: list(t.shape) for key, t in model.state_dict().items()}
    differ = [k for k in shapes if k in expected and shapes[k] != expected[k]]
    unexpected = [k for k in shapes if k not in expected]
    if differ or unexpected:
        first = differ[0] if differ else unexpected[0]
        what = (f"{first!r} has shape {shapes[first]} in the file but {expected[first]} in the model"
                if differ else f"{first!r} is in the file but not in the model")
        m = cfg.model
        raise CheckpointError(
            f"{path}: the weights do not match the config stored beside them (model.dim={m.dim}, "
            f"depth={m.depth}, heads={m.heads}, mixer={m.mixer}, kernel={m.kernel}): {what}; "
            f"{len(differ)} tensor(s) differ in shape, {len(unexpected)} unexpected. state.json and "
            "the weights come from different runs: restore the matching pair or train again"
        )
    try:
        load_model(model, str(path), device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be loaded into the model ({_reason(error)}); "
                              f"{DAMAGED_HINT}") from None


def load_trainer_state(
    run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainerState:
    """Load weights and optimizer state in place; return step, history and RNG states."""
    recover_checkpoint(run_dir)
    folder = checkpoint_folder(run_dir)
    meta = read_state(folder)
    load_weights(model, folder / "model.safetensors", _config_of(folder, meta))
    trainer_path = folder / "trainer.safetensors"
    tensors = _load_safetensors(trainer_path)
    for name in ("rng.torch", "rng.data"):
        if name not in tensors:
            raise CheckpointError(f"{trainer_path}: the tensor {name!r} is missing; {DAMAGED_HINT}")
    optim_json = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, slots in optim_json["plain_state"].items():
        state.setdefault(int(index), {}).update(slots)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": optim_json["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: the optimizer state does not fit the model "
                              f"({_reason(error)}); {DAMAGED_HINT}") from None
    return TrainerState(meta["step"], meta["history"], tensors["rng.torch"], tensors["rng.data"])


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Task, RunConfig]:
    """Rebuild a trained run: ``(model in eval mode, task, config)``."""
    folder = checkpoint_folder(run_dir)
    cfg = _config_of(folder, read_state(folder))
    task = build_task(cfg)
    model = build_model(cfg, task)
    load_weights(model, folder / "model.safetensors", cfg, device=device)
    return model.to(device).eval(), task, cfg
