"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout of ``RUN_DIR/checkpoint/``:

* ``model.safetensors``   model weights (tied weights stored once),
* ``trainer.safetensors`` optimizer state tensors and the RNG states (torch + data),
* ``state.json``          step, the full config, optimizer hyper-parameters, history.

A checkpoint is written to a temporary folder and renamed into place, so an interrupted
save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from formerlab.data import Task
from formerlab.train.build import build_model, build_task
from formerlab.train.config import RunConfig, validate_config

CHECKPOINT_DIR = "checkpoint"


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


def save_checkpoint(
    run_dir: Path,
    cfg: RunConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
) -> Path:
    """Write the checkpoint of ``run_dir`` atomically; returns its folder."""
    final = Path(run_dir) / CHECKPOINT_DIR
    tmp = Path(run_dir) / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors, optim_json = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = state.torch_rng
    tensors["rng.data"] = state.data_rng
    save_file(tensors, str(tmp / "trainer.safetensors"))
    meta = {
        "step": state.step,
        "config": cfg.model_dump(mode="json"),
        "optimizer": optim_json,
        "history": state.history,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = Path(run_dir) / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_folder(run_dir: str | Path) -> Path:
    """The checkpoint folder of ``run_dir``; ``FileNotFoundError`` if there is none."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint in {str(run_dir)!r} (expected {str(folder / 'state.json')!r}); "
            "pass the folder of a run made by `formerlab train`"
        )
    return folder


def read_config(run_dir: str | Path) -> RunConfig:
    """The validated config stored with a run's checkpoint."""
    meta = json.loads((checkpoint_folder(run_dir) / "state.json").read_text())
    return validate_config(meta["config"])


def load_trainer_state(
    run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainerState:
    """Load weights and optimizer state in place; return step, history and RNG states."""
    folder = checkpoint_folder(run_dir)
    meta = json.loads((folder / "state.json").read_text())
    load_model(model, str(folder / "model.safetensors"))
    tensors = load_file(str(folder / "trainer.safetensors"))
    optim_json = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, slots in optim_json["plain_state"].items():
        state.setdefault(int(index), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": optim_json["param_groups"]})
    return TrainerState(meta["step"], meta["history"], tensors["rng.torch"], tensors["rng.data"])


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Task, RunConfig]:
    """Rebuild a trained run: ``(model in eval mode, task, config)``."""
    cfg = read_config(run_dir)
    task = build_task(cfg)
    model = build_model(cfg, task)
    load_model(model, str(checkpoint_folder(run_dir) / "model.safetensors"), device=device)
    return model.to(device).eval(), task, cfg
