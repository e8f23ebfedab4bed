"""The config a resumed run continues with: the checkpoint's, plus explicit overrides.

``resume_config(run_dir, overrides)``

* starts from the config stored in the checkpoint (what the weights were trained with);
* applies ``overrides`` (``"train.steps=2000"``) for the keys a resumed run may change,
  ``RESUMABLE_KEYS`` (how long it runs and its bookkeeping; not the model, data, optimiser
  or seed, which would make the run something else); other keys are refused, naming the
  allowed ones;
* refuses a ``RUN_DIR/config.yaml`` edited to differ from that config, naming each key with
  the checkpoint's and the file's value: a resume used to restore the stored config silently
  and overwrite the edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from formerlab.train.checkpoint import read_config
from formerlab.train.config import (
    ConfigError,
    RunConfig,
    apply_override,
    parse_yaml,
    validate_config,
)

#: keys a resumed run may change (``--set KEY=VALUE`` with ``--resume``)
RESUMABLE_KEYS = (
    "train.steps",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.checkpoint_every",
    "train.time_budget_s",
    "sample.tokens",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 3}}`` -> ``{"train.steps": 3}`` (empty mappings kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key whose value differs."""
    a, b = flatten(old.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())
            if a.get(k, missing) != b.get(k, missing)]


def _show(value: Any) -> str:
    return "(unset)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config to continue ``run_dir`` with (see the module docstring); ``ConfigError``
    for a disallowed override or an edited ``config.yaml``."""
    stored = read_config(run_dir)
    raw = stored.model_dump(mode="json")
    for assignment in overrides or []:
        key = assignment.split("=", 1)[0].strip()
        if "=" in assignment and key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--set {assignment!r}: {key!r} cannot change when resuming {str(run_dir)!r} "
                f"(the run would no longer be the one its checkpoint holds); keys a resumed run "
                f"may change: {list(RESUMABLE_KEYS)}. To change {key!r}, start a new run"
            )
        apply_override(raw, assignment)
    try:
        cfg = validate_config(raw)
    except ConfigError as error:
        raise ConfigError(f"resuming {str(run_dir)!r} with {overrides}: {error}") from None
    _check_config_file(Path(run_dir), stored, cfg)
    return cfg


def _check_config_file(run_dir: Path, stored: RunConfig, cfg: RunConfig) -> None:
    """Refuse a ``config.yaml`` edited to differ from the checkpoint's config ``stored``,
    except where the overrides (already in ``cfg``) make the same change."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    raw = parse_yaml(path.read_text(), str(path))
    try:
        edited = validate_config(raw if raw is not None else {})
    except ConfigError as error:
        raise ConfigError(f"{path} was edited and is no longer a valid config ({error}); a resume "
                          "continues the checkpoint's config: restore the file") from None
    # an edit the overrides make too (config.yaml edited to train.steps: 40, resumed with
    # train.steps=40) is no conflict; the file is rewritten with the config used
    wanted = flatten(cfg.model_dump(mode="json"))
    differ = [(key, old, new) for key, old, new in config_differences(stored, edited)
              if wanted.get(key) != new]
    if not differ:
        return
    lines = [f"{key}: {_show(old)} in the checkpoint, {_show(new)} in config.yaml"
             for key, old, new in differ]
    allowed = [key for key, _, _ in differ if key in RESUMABLE_KEYS]
    hint = (f"to change {allowed} pass them as overrides (--set "
            f"{' --set '.join(f'{k}={_yaml_value(v)}' for k, _, v in differ if k in allowed)}); "
            if allowed else "")
    raise ConfigError(
        f"{path} differs from the config stored in the checkpoint of {str(run_dir)!r}, which a "
        f"resume continues (it would overwrite the edit):\n  " + "\n  ".join(lines) + "\n"
        f"{hint}keys a resumed run may change: {list(RESUMABLE_KEYS)}; for other changes start "
        f"a new run (formerlab train {path} writes a new run folder). Restore config.yaml to resume "
        "as stored"
    )


def _yaml_value(value: Any) -> str:
    import json

    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value
