"""Typed run configuration (pydantic), validated in full before any work starts.

A run is ``task`` + ``model`` + ``train`` + ``tracking`` (+ ``sample`` for language
models). YAML files are read with ``yaml.safe_load``; ``--set key=value`` overrides use
dotted paths (``model.kernel_options.num_landmarks=32``) with YAML-typed values.
Errors name the bad key, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from formerlab import attention, data, mixers


class ConfigError(ValueError):
    """A configuration problem: which key, which value, what is allowed."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(StrictModel):
    """Which task and its keyword options (see ``formerlab.data.available()``)."""

    name: str = "shakespeare_chars"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        data.TASKS.entry(value)
        return value

    @model_validator(mode="after")
    def _known_options(self) -> TaskConfig:
        data.TASKS.check_options(self.name, self.options)
        return self


class HFConfig(StrictModel):
    """A local Hugging Face checkpoint to fine-tune with a formerlab kernel in its attention
    (``formerlab.integrations.hf``; needs ``pip install formerlab[hf]``)."""

    path: str
    kernel: str
    kernel_options: dict[str, Any] = Field(default_factory=dict)
    layers: list[int] | None = None

    @field_validator("kernel")
    @classmethod
    def _known_kernel(cls, value: str) -> str:
        attention.KERNELS.entry(value)
        return value

    @model_validator(mode="after")
    def _known_options(self) -> HFConfig:
        attention.KERNELS.check_options(self.kernel, self.kernel_options)
        return self


class ModelConfig(StrictModel):
    """Model shape and the token mixer / attention kernel plugged into every block.

    ``kernel`` and ``kernel_options`` reach mixers that take a kernel (``attention``,
    ``metric``, ...). ``deq`` (a dict of DEQ options) replaces the block stack with one
    weight-tied block solved to its fixed point.
    """

    dim: int = Field(128, ge=1)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mixer: str = "attention"
    kernel: str = "softmax"
    mixer_options: dict[str, Any] = Field(default_factory=dict)
    kernel_options: dict[str, Any] = Field(default_factory=dict)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    max_len: int | None = Field(None, ge=1)
    deq: dict[str, Any] | None = None
    hf: HFConfig | None = None  # set: the HF model replaces the formerlab model above

    @field_validator("mixer")
    @classmethod
    def _known_mixer(cls, value: str) -> str:
        mixers.MIXERS.entry(value)
        return value

    @field_validator("kernel")
    @classmethod
    def _known_kernel(cls, value: str) -> str:
        attention.KERNELS.entry(value)
        return value

    def build_options(self) -> dict[str, Any]:
        """Options for ``mixers.build``: the mixer's own, plus the kernel and its options
        for mixers that take a kernel."""
        options = dict(self.mixer_options)
        entry = mixers.MIXERS.entry(self.mixer)
        if entry.accepts_any_option() or "kernel" in entry.options():
            options.setdefault("kernel", self.kernel)
            options.update(self.kernel_options)
        return options

    @model_validator(mode="after")
    def _known_options(self) -> ModelConfig:
        mixers.MIXERS.check_options(self.mixer, self.mixer_options)
        attention.KERNELS.check_options(self.kernel, self.kernel_options)
        # Build one mixer now (cheap) so that option errors of mixers taking **options,
        # and of their kernels, surface before any work rather than at model build.
        mixers.build(self.mixer, dim=self.dim, heads=self.heads, **self.build_options())
        if self.deq is not None:
            from formerlab.models.deq import deq_option_names

            unknown = sorted(set(self.deq) - set(deq_option_names()))
            if unknown:
                raise ValueError(
                    f"unknown model.deq option(s) {unknown}; valid options: {deq_option_names()}"
                )
        return self


class TrainConfig(StrictModel):
    """Optimiser, schedule (linear warm-up, cosine decay to ``min_lr``) and bookkeeping."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(200, ge=1)
    eval_batches: int = Field(20, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="default: at every eval")
    bf16: bool = False
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda") and value != "mps":
            raise ValueError(f"device={value!r} is not allowed; expected 'cpu', 'cuda[:N]' or 'mps'")
        return value


class TrackingConfig(StrictModel):
    """MLflow by default, to ``<runs_dir>/mlflow.db``; ``uri`` points at any MLflow server."""

    backend: Literal["mlflow", "none"] = "mlflow"
    uri: str | None = None
    experiment: str = "formerlab"


class SampleConfig(StrictModel):
    """Text generated at the end of a language-model run."""

    prompt: str = "\n"
    tokens: int = Field(300, ge=0)
    temperature: float = Field(0.8, gt=0)
    top_k: int | None = Field(None, ge=1)


class RunConfig(StrictModel):
    """One training run."""

    name: str = "run"
    seed: int = 0
    runs_dir: str = "runs"
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_shorthand(cls, value: Any) -> Any:
        # `tracking: none` / `tracking: mlflow` are accepted as shorthands.
        return {"backend": value} if isinstance(value, str) else value


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the config section that ``loc`` points into."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: dotted key, what is wrong, the value given."""
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not str(p).startswith("function-"))
        key = ".".join(str(p) for p in loc) or "<config>"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}; allowed keys here: {_allowed_keys(loc)}")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {item.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict into a ``RunConfig``; raise ``ConfigError`` on any problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys; got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value (e.g. train.steps=100)")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} is not a dotted path like model.kernel")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return validate_config(raw)


def config_hash(cfg: RunConfig) -> str:
    """A short stable hash of the config (for run names and skipping finished trials)."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
