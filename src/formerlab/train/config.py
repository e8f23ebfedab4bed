"""Typed run configuration (pydantic), validated in full before any work starts.

A run is ``task`` + ``model`` + ``train`` + ``tracking`` (+ ``sample`` for language
models). YAML files are read with ``yaml.safe_load``; ``--set key=value`` overrides use
dotted paths (``model.kernel_options.num_landmarks=32``) with YAML-typed values.
Errors name the bad key, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from formerlab import attention, data, mixers


class ConfigError(ValueError):
    """A configuration problem: which key, which value, what is allowed."""


def _numeric_kinds(annotation: Any) -> set[type]:
    """``{int}`` / ``{float}`` for fields annotated ``int``, ``float | None``, ..."""
    if annotation in (int, float):
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if a in (int, float)}
    return set()


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode turns `steps: true` into 1; a YAML bool is never a number here
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None:
            kinds = _numeric_kinds(field.annotation)
            if kinds and bool not in typing.get_args(field.annotation) and field.annotation is not bool:
                name = "an integer" if kinds == {int} else "a number"
                raise ValueError(f"expected {name}, not a boolean")
        return value


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
    # learned | rope | none (formerlab.models.embedding); rope/none decode past max_len
    positions: Literal["learned", "rope", "none"] = "learned"
    # classifiers: a linear head, or mlp = Linear(dim, mlp_ratio * dim), ReLU, Linear
    head: Literal["linear", "mlp"] = "linear"
    # encoder and tagger tasks: run the blocks causally (a causal-only mixer can classify)
    causal: bool = False
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
            check_deq_values(self.deq)
        return self


def _deq_fails(options: dict[str, Any]) -> ValueError | None:
    """The error ``formerlab.deq.DEQ`` raises for ``options`` (cheap: f is the identity)."""
    from formerlab.deq import DEQ

    try:
        DEQ(lambda z, x: z, **options)
    except ValueError as error:
        return error
    return None


def check_deq_values(deq: dict[str, Any]) -> None:
    """Check the values of ``model.deq`` now; errors name ``model.deq.<key>``."""
    from formerlab.deq.norm import NORMS

    options = dict(deq)
    norm = options.pop("norm", "none")
    if norm not in NORMS:
        raise ValueError(f"model.deq.norm={norm!r} is not allowed; expected one of {list(NORMS)}")
    error = _deq_fails(options)
    if error is None:
        return
    # the culprit is the option that fails on its own (with the solver it configures)
    companions = {"solver_options": ("solver",), "backward_options": ("solver", "backward_solver")}
    for key in options:
        alone = {k: options[k] for k in (key, *companions.get(key, ())) if k in options}
        if _deq_fails(alone) is not None:
            text = str(error)
            prefix = "model.deq." if text.startswith(f"{key}=") else f"model.deq.{key}: "
            raise ValueError(prefix + text) from None
    raise ValueError(f"model.deq: {error}") from None


class TrainConfig(StrictModel):
    """Optimiser (AdamW), schedule (``formerlab.train.schedule``) and bookkeeping.

    ``schedule: cosine`` warms up linearly to ``lr`` and decays to ``min_lr``;
    ``schedule: one_cycle`` is torch's linear OneCycleLR (``min_lr`` and ``beta1`` unused).
    ``grad_clip: null`` turns clipping off. ``test_at_best`` keeps the weights of the best
    validation evaluation (the task's main metric) and scores the task's test split once
    with them at the end of the run (``RUN_DIR/test.json``). ``packing: true`` runs every
    batch packed (the same examples, the same loss; see ``formerlab.data.packing``).
    """

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup: int = Field(100, ge=0)
    schedule: Literal["cosine", "one_cycle"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(200, ge=1)
    eval_batches: int = Field(20, ge=1)
    test_at_best: bool = False
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="default: at every eval")
    bf16: bool = False
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)
    compile: bool = Field(False, description="torch.compile the model (inductor)")
    time_budget_s: float | None = Field(None, gt=0)
    packing: bool = Field(
        False, strict=True,
        description="train (and evaluate) on packed batches: each batch's examples laid end to "
        "end in one row with cu_seqlens, no padding (formerlab.data.packing)",
    )

    @model_validator(mode="after")
    def _one_cycle_warmup(self) -> TrainConfig:
        if self.schedule == "one_cycle" and not 2 <= self.warmup < self.steps:
            raise ValueError(
                f"train.warmup={self.warmup} is not allowed with train.schedule='one_cycle' "
                f"and train.steps={self.steps}; expected 2 <= warmup < steps (the rate peaks at "
                "step warmup)"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        allowed = available_devices()
        if value not in allowed:
            known = re.fullmatch(r"cuda(:[0-9]+)?|mps", value)  # a device, but not here
            what = "is not available on this machine" if known else "is not a device name"
            raise ValueError(f"device={value!r} {what}; expected one of {allowed}")
        return value


def available_devices() -> list[str]:
    """The ``train.device`` values this machine can run: cpu, cuda / cuda:N for each visible
    GPU, mps where PyTorch's Metal backend is available."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


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


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with a one-line ``ConfigError`` naming ``where`` on a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at}: {problem}; fix the YAML there "
                          "(quote values that hold ':', '#', '[' or '{')") from None


def read_yaml_file(path: str | Path, what: str = "config") -> Any:
    """Read a YAML file; missing, unreadable, empty or malformed files raise ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read this {what} file ({error})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: the {what} file is empty; write the keys to set "
                          "(see configs/ for examples), or leave the file out to use the defaults")
    return raw


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
    node[parts[-1]] = parse_yaml(text, f"--set {assignment!r}: the value") if text.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_file(path, "config")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys (key: value lines); "
                              f"got a {type(raw).__name__}")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return validate_config(raw)
    except ConfigError as error:
        if path is None:
            raise
        raise ConfigError(f"{path}: {error}") from None


def config_hash(cfg: RunConfig) -> str:
    """A short stable hash of the config (for run names and skipping finished trials)."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
