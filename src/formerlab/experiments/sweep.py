"""Ablation sweeps: a base config + axes -> validated trials -> results on disk.

A sweep file (YAML)::

    name: quick-ablation
    base: {task: ..., model: ..., train: ...}      # a RunConfig mapping (or a YAML path)
    axes:
      model.kernel: [softmax, linear]              # a config key: each value is assigned
      mechanism:                                   # a named axis: each value is a bundle
        - {label: metric, model.mixer: metric}     # of dotted overrides (+ optional label)
      seed: [0, 1]
    trials:                                        # optional explicit list of bundles
      - {label: nystrom-64, model.kernel: nystrom, model.kernel_options: {num_landmarks: 64}}

Trials are the cross product of the axes (``trials``, when given, is one more axis). Every
trial's config is validated, and its model built once, before the first trial starts.

On disk (``SWEEP_DIR``; the file names and result I/O live in ``results``): ``sweep.json``
(the spec and the trial list), ``trials/<label>-<hash>/`` per trial (the run: config,
checkpoint, ``result.json``), ``mlflow.db`` (the default tracking store: one parent run
for the sweep, one child run per trial). A trial's identity is the hash of its config
without ``name``, ``runs_dir`` and ``tracking``, so ``--resume`` recognises finished
trials whatever the sweep folder is called. Its torch thread count is part of that config
(``train.threads``, pinned to ``DEFAULT_TRIAL_THREADS`` when unset), so results do not
depend on ``--workers``.

Resuming is refused when the trials' settings differ from those stored in ``sweep.json``
(``check_same_settings`` names the keys) and while a live process owns a trial folder
(``check_trial_locks``; locks of dead owners are taken over, see ``trial``).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from formerlab import mixers
from formerlab.experiments.backends import make_backend
from formerlab.experiments.results import (  # noqa: F401 - RESULT_FILE: re-exported
    COMPLETED,
    FAILED,
    RESULT_FILE,
    SWEEP_FILE,
    TRIALS_DIR,
    read_result,
    write_json,
)
from formerlab.experiments.trial import LOCK_FILE, TrialJob, owner_alive, read_owner
from formerlab.train.build import build_model, build_task
from formerlab.train.config import (
    ConfigError,
    RunConfig,
    TrackingConfig,
    apply_override,
    config_hash,
    read_yaml_file,
    validate_config,
)

SWEEP_KEYS = ("name", "description", "base", "axes", "trials")
BACKENDS = ("local", "ray")
#: torch threads of a trial whose config leaves ``train.threads`` unset. Pinned in the
#: trial's config (so in its hash), never derived from ``--workers``: float reductions
#: depend on the thread count, and a trial's result must not depend on its neighbours.
DEFAULT_TRIAL_THREADS = 1


# --- the spec ---------------------------------------------------------------------------


@dataclass
class AxisValue:
    """One value of an axis: a label and the dotted overrides it applies."""

    label: str
    overrides: dict[str, Any]


@dataclass
class Axis:
    """A named list of values; the sweep is the cross product of its axes."""

    name: str
    values: list[AxisValue]

    def touches(self, prefix: str) -> bool:
        """Whether any value overrides a key equal to or under ``prefix``."""
        return any(
            key == prefix or key.startswith(prefix + ".")
            for value in self.values
            for key in value.overrides
        )


@dataclass
class SweepSpec:
    """A parsed sweep file (not yet expanded into trials)."""

    name: str
    base: dict[str, Any]
    axes: list[Axis]
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def _is_config_path(key: str) -> bool:
    return key.split(".")[0] in RunConfig.model_fields


def _value_label(key: str, value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    else:
        text = str(value)
    # the mechanism / task keys read best as bare values, the rest as key=value
    if key in ("model.kernel", "model.mixer", "task.name", "task"):
        return text
    return f"{key.split('.')[-1]}={text}"


def _is_bundle(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        k == "label" or "." in str(k) or str(k) in RunConfig.model_fields for k in value
    )


def _parse_axis(name: str, values: Any) -> Axis:
    where = f"axis {name!r}"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of values; got {values!r}")
    parsed = []
    for i, value in enumerate(values):
        if _is_bundle(value):
            overrides = {str(k): v for k, v in value.items() if k != "label"}
            if not overrides:
                raise ConfigError(f"{where}, value {i}: a bundle needs at least one override")
            label = value.get("label")
            if label is None:
                label = "/".join(_value_label(k, v) for k, v in overrides.items())
            parsed.append(AxisValue(str(label), overrides))
        elif _is_config_path(name):
            parsed.append(AxisValue(_value_label(name, value), {name: value}))
        else:
            raise ConfigError(
                f"{where}, value {i} ({value!r}): {name!r} is not a config key (config keys "
                f"start with one of {list(RunConfig.model_fields)}), so each value must be a "
                "mapping of dotted overrides, e.g. {label: metric, model.mixer: metric}"
            )
    labels = [v.label for v in parsed]
    duplicates = sorted({lab for lab in labels if labels.count(lab) > 1})
    if duplicates:
        raise ConfigError(f"{where}: labels must be distinct; repeated: {duplicates}")
    return Axis(name, parsed)


def parse_sweep(raw: Any, source: Path | None = None) -> SweepSpec:
    """Parse a sweep mapping; ``source`` (the file) resolves a ``base`` given as a path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a sweep must be a mapping with keys {list(SWEEP_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown}; allowed: {list(SWEEP_KEYS)}")
    name = raw.get("name") or (source.stem if source else "sweep")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
        raise ConfigError(f"sweep name={name!r} is not allowed; use letters, digits, '.', '_', '-'")
    base = raw.get("base", {}) or {}
    if isinstance(base, str):
        path = Path(base) if source is None or Path(base).is_absolute() else source.parent / base
        if not path.is_file():
            raise ConfigError(f"base={base!r}: config file {str(path)!r} does not exist")
        base = read_yaml_file(path, "config")
    if not isinstance(base, dict):
        raise ConfigError(f"base must be a config mapping or a YAML path; got {type(base).__name__}")
    axes_raw = raw.get("axes", {}) or {}
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"axes must map an axis name to a list of values; got {type(axes_raw).__name__}")
    axes = [_parse_axis(str(k), v) for k, v in axes_raw.items()]
    if raw.get("trials") is not None:
        if "trial" in axes_raw:
            raise ConfigError("axis name 'trial' is reserved for the explicit `trials` list")
        trials = _parse_axis("trial", raw["trials"])
        if not all(_is_bundle(v) for v in raw["trials"]):
            raise ConfigError("every entry of `trials` must be a mapping of dotted overrides")
        axes.insert(0, trials)
    return SweepSpec(str(name), base, axes, str(raw.get("description", "")), raw)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and parse a sweep YAML file."""
    path = Path(path)
    raw = read_yaml_file(path, "sweep")
    try:
        return parse_sweep(raw, source=path)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


# --- trials -----------------------------------------------------------------------------


@dataclass
class Trial:
    """One configuration of the sweep."""

    index: int
    labels: dict[str, str]  # axis name -> value label
    overrides: dict[str, Any]
    config: RunConfig
    key: str  # trial hash (see ``trial_hash``)
    mechanism: str  # label of the non-task, non-seed axes (or the mixer/kernel name)

    @property
    def label(self) -> str:
        return " ".join(self.labels.values()) or "base"

    @property
    def dirname(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(self.labels.values()) or "base")
        return f"{slug[:80]}-{self.key}"

    def summary(self, folder: Path | None = None) -> dict[str, Any]:
        """The trial's entry in ``sweep.json``; ``folder`` is where it already is on disk,
        if anywhere (a folder found by hash keeps the label it was made with)."""
        return {
            "index": self.index, "label": self.label, "labels": self.labels, "hash": self.key,
            "dir": f"{TRIALS_DIR}/{folder.name if folder else self.dirname}", "mechanism": self.mechanism,
            "overrides": self.overrides, "config": self.config.model_dump(mode="json"),
        }


def trial_hash(cfg: RunConfig) -> str:
    """The config hash with bookkeeping keys neutralised (name, runs_dir, tracking)."""
    neutral = cfg.model_copy(update={"name": "trial", "runs_dir": ".", "tracking": TrackingConfig()})
    return config_hash(neutral)


def mechanism_name(cfg: RunConfig) -> str:
    """``softmax`` for attention mixers, ``metric`` / ``pooling`` for kernel-free mixers,
    ``mixer[kernel]`` for other mixers that take a kernel; ``deq-`` prefix for DEQ bodies."""
    m = cfg.model
    entry = mixers.MIXERS.entry(m.mixer)
    takes_kernel = entry.accepts_any_option() or "kernel" in entry.options()
    if m.mixer == "attention":
        name = m.kernel
    else:
        name = f"{m.mixer}[{m.kernel}]" if takes_kernel else m.mixer
    return f"deq-{name}" if m.deq is not None else name


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict (creating sections); the value is copied."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section (it is {child!r})")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def expand(spec: SweepSpec, sweep_dir: Path, check_models: bool = True) -> list[Trial]:
    """All trials of ``spec`` as validated configs rooted at ``sweep_dir``.

    Every problem of every trial is collected and raised together as one ``ConfigError``
    that names the trial and the key. With ``check_models`` each distinct task is built
    (cheaply: generated tasks draw their data lazily) and each trial's model is built once,
    so a mechanism that cannot run on a task (a non-causal kernel on a decoder task, a bad
    kernel option) fails here, not an hour into the sweep.
    """
    mechanism_axes = [a for a in spec.axes if not (a.touches("task") or a.touches("seed"))]
    combos = list(itertools.product(*[a.values for a in spec.axes])) if spec.axes else [()]
    problems: list[str] = []
    trials: list[Trial] = []
    tasks: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for index, combo in enumerate(combos):
        labels = {axis.name: value.label for axis, value in zip(spec.axes, combo)}
        label = " ".join(labels.values()) or "base"
        overrides: dict[str, Any] = {}
        for value in combo:
            overrides.update(value.overrides)
        raw = copy.deepcopy(spec.base)
        try:
            for key, value in overrides.items():
                set_dotted(raw, key, value)
            train_section = raw.setdefault("train", {})
            if isinstance(train_section, dict) and train_section.get("threads") is None:
                train_section["threads"] = DEFAULT_TRIAL_THREADS
            raw["name"] = f"{index:03d} {label}"  # the MLflow child run's name
            raw["runs_dir"] = str(sweep_dir.resolve())
            cfg = validate_config(raw)
        except ConfigError as error:
            problems.append(f"trial {index} ({label}): {error}")
            continue
        key = trial_hash(cfg)
        if key in seen:
            problems.append(f"trial {index} ({label}) has the same config as trial {seen[key]}")
            continue
        seen[key] = index
        if check_models:
            try:
                task_key = json.dumps(cfg.task.model_dump(mode="json"), sort_keys=True)
                if task_key not in tasks:
                    tasks[task_key] = build_task(cfg)
                build_model(cfg, tasks[task_key])
            except (ValueError, TypeError, FileNotFoundError) as error:
                problems.append(f"trial {index} ({label}): {error}")
                continue
        mech_labels = [labels[a.name] for a in mechanism_axes]
        mechanism = " ".join(mech_labels) if mech_labels else mechanism_name(cfg)
        trials.append(Trial(index, labels, overrides, cfg, key, mechanism))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConfigError(
            f"sweep {spec.name!r}: {len(problems)} of {len(combos)} trial(s) are invalid:\n  "
            + "\n  ".join(p.replace("\n", "\n    ") for p in shown)
        )
    return trials


# --- sweep folders on disk (file names, result I/O: ``results``) -----------------------


def find_trial_dir(sweep_dir: Path, key: str) -> Path | None:
    """The folder of the trial with hash ``key``, whatever its label part is."""
    matches = sorted((Path(sweep_dir) / TRIALS_DIR).glob(f"*-{key}"))
    return matches[0] if matches else None


def default_sweep_dir(spec: SweepSpec, runs_dir: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``."""
    return Path(runs_dir) / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def latest_sweep_dir(spec: SweepSpec, runs_dir: str | Path = "runs") -> Path | None:
    """The newest ``runs/<name>-*`` holding a ``sweep.json`` (what ``--resume`` continues)."""
    found = [p for p in Path(runs_dir).glob(f"{spec.name}-*") if (p / SWEEP_FILE).is_file()]
    return max(found, key=lambda p: p.name) if found else None


# --- resuming ---------------------------------------------------------------------------


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


_NEUTRAL = ("name", "runs_dir", "tracking")  # not part of a trial's identity (``trial_hash``)


def check_same_settings(previous: dict[str, Any], trials: list[Trial], sweep_dir: Path) -> None:
    """Refuse (``ConfigError``) to resume a sweep whose trials differ from the stored ones,
    naming the keys that differ: a silent restart would overwrite the old trials."""
    stored = {t["label"]: t for t in previous.get("trials") or [] if isinstance(t, dict) and "label" in t}
    if not stored or {t["hash"] for t in stored.values()} == {t.key for t in trials}:
        return
    diffs: dict[str, tuple[Any, Any]] = {}
    for trial in trials:
        old = stored.get(trial.label)
        if old is None or old.get("hash") == trial.key:
            continue
        a, b = _flat(old.get("config", {})), _flat(trial.config.model_dump(mode="json"))
        for key in sorted(set(a) | set(b)):
            if key.split(".")[0] not in _NEUTRAL and a.get(key) != b.get(key):
                diffs.setdefault(key, (a.get(key), b.get(key)))
    new_labels = {t.label for t in trials}
    added, removed = sorted(new_labels - set(stored)), sorted(set(stored) - new_labels)
    parts = []
    if diffs:
        shown = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(diffs.items())[:8]]
        parts.append("settings that differ: " + ", ".join(shown))
    if added:
        parts.append(f"trials it does not hold: {added[:5]}" + (" ..." if len(added) > 5 else ""))
    if removed:
        parts.append(f"trials it holds that are gone: {removed[:5]}" + (" ..." if len(removed) > 5 else ""))
    raise ConfigError(
        f"--resume: {str(sweep_dir / SWEEP_FILE)!r} was made with other settings; "
        + "; ".join(parts) + f". Resume it with the settings it was made with (its --set: "
        f"{previous.get('overrides') or 'none'}), or start a new sweep: drop --resume (a new "
        "folder is made) or pass another --out"
    )


def check_trial_locks(jobs: list[Any], console: Console) -> None:
    """Before resuming: refuse while a live process owns a trial folder; say which dead
    owners' locks will be taken over."""
    busy = []
    for job in jobs:
        lock = Path(job.trial_dir) / LOCK_FILE
        owner = read_owner(job.trial_dir)
        if owner is None:
            continue
        if owner_alive(owner, lock):
            busy.append(f"{job.label} (process {owner.get('pid')} on {owner.get('host')}, {lock})")
        else:
            console.print(f"trial {escape(job.label)}: taking over the lock of process "
                          f"{owner.get('pid')}, which is no longer running ({escape(str(lock))})",
                          highlight=False, soft_wrap=True)
    if busy:
        raise ValueError(
            f"{len(busy)} trial folder(s) are in use by a running process: " + "; ".join(busy[:5])
            + ". Another `formerlab ablate` is running this sweep: wait for it or stop it, then "
            "--resume (delete a lock file only if its process is gone)"
        )


# --- running ----------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    """What ``run_sweep`` did."""

    sweep_dir: Path
    trials: list[Trial]
    results: dict[str, dict[str, Any]]  # trial hash -> result
    skipped: list[str]  # hashes completed before this call
    ran: list[str]  # hashes run by this call
    wall_s: float
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def completed(self) -> int:
        return sum(r.get("status") == COMPLETED for r in self.results.values())

    @property
    def failed(self) -> int:
        return sum(r.get("status") == FAILED for r in self.results.values())


def _parent_tracker(trials: list[Trial], spec: SweepSpec, sweep_dir: Path):
    """The sweep's MLflow parent run (reused on resume), or None with ``tracking: none``."""
    from formerlab.experiments.tracking import MLflowTracker, make_tracker

    tracker = make_tracker(trials[0].config, tags={"formerlab.sweep": spec.name})
    if not isinstance(tracker, MLflowTracker):
        return None
    tracker.skip_logged_steps = False  # sweep counters restart at the resumed count
    params = {
        "sweep.name": spec.name, "sweep.trials": len(trials),
        **{f"axis.{a.name}": ", ".join(v.label for v in a.values) for a in spec.axes},
    }
    tracker.start(spec.name, sweep_dir, params)
    tracker.set_tag("formerlab.sweep_dir", str(sweep_dir.resolve()))
    return tracker


def run_sweep(
    spec: SweepSpec | str | Path,
    out: str | Path | None = None,
    backend: str = "local",
    workers: int | None = None,
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    overrides: list[str] | None = None,
) -> SweepOutcome:
    """Validate every trial, then run those not completed yet; returns a ``SweepOutcome``.

    ``backend="local"`` runs in this process (``workers`` None or 1) or in ``workers``
    spawned processes; ``backend="ray"`` submits each trial as a Ray task (a local Ray
    instance with ``workers`` CPUs, default all, or the cluster at ``address``). A trial
    that raises, hits a NaN loss or exceeds ``train.time_budget_s`` is recorded as failed
    and the sweep goes on.
    ``resume=True`` continues ``out`` (default: the newest ``runs/<name>-*``), skipping
    completed trials; failed trials are run again, interrupted ones continue from their
    checkpoint; other settings than the stored ones are refused (``ConfigError``). Without
    ``resume`` an ``out`` that already holds a sweep is an error.
    ``overrides`` (``["train.device=cuda"]``) change the base config before the axes apply;
    they change the trials' hashes, so a resumed sweep needs the same ones.
    """
    console = console or Console()
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    if overrides:
        base = copy.deepcopy(spec.base)
        for assignment in overrides:
            apply_override(base, assignment)
        spec = SweepSpec(spec.name, base, spec.axes, spec.description, spec.raw)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; expected one of {list(BACKENDS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r} is not allowed; expected an integer >= 1 (or None)")
    if address is not None and backend != "ray":
        raise ValueError(f"address={address!r} needs backend='ray' (got backend={backend!r})")
    runs_dir = spec.base.get("runs_dir", "runs")
    if out is None and resume:
        out = latest_sweep_dir(spec, runs_dir)
        if out is None:
            raise ValueError(f"--resume: no earlier sweep {spec.name!r} under {runs_dir!r}; pass --out DIR")
    sweep_dir = Path(out) if out is not None else default_sweep_dir(spec, runs_dir)
    if (sweep_dir / SWEEP_FILE).is_file() and not resume:
        raise ValueError(
            f"{str(sweep_dir)!r} already holds a sweep; pass --resume to continue it or "
            "another --out for a new one"
        )
    trials = expand(spec, sweep_dir)  # raises before anything is written
    previous = {}
    if (sweep_dir / SWEEP_FILE).is_file():
        try:
            previous = json.loads((sweep_dir / SWEEP_FILE).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{sweep_dir / SWEEP_FILE}: not valid JSON ({error.msg}); restore it, "
                             "or start a new sweep with another --out") from None
        check_same_settings(previous, trials, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    found = {t.key: find_trial_dir(sweep_dir, t.key) for t in trials}
    meta = {
        "name": spec.name, "description": spec.description, "spec": spec.raw,
        "axes": [{"name": a.name, "labels": [v.label for v in a.values],
                  "keys": sorted({k for v in a.values for k in v.overrides}),
                  "task": a.touches("task"), "seed": a.touches("seed")} for a in spec.axes],
        "created": previous.get("created", datetime.now().isoformat(timespec="seconds")),
        "backend": backend, "workers": workers, "overrides": list(overrides or []),
        "trials": [t.summary(found[t.key]) for t in trials],
        "runs": previous.get("runs", []),
    }
    write_json(sweep_dir / SWEEP_FILE, meta)

    results: dict[str, dict[str, Any]] = {}
    jobs: list[TrialJob] = []
    for trial in trials:
        trial_dir = found[trial.key]
        result = read_result(trial_dir) if trial_dir else None
        if result is not None and result.get("status") == COMPLETED:
            results[trial.key] = result
            continue
        jobs.append(TrialJob(
            index=trial.index, label=trial.label, labels=trial.labels, key=trial.key,
            mechanism=trial.mechanism, config=trial.config.model_dump(mode="json"),
            trial_dir=str((trial_dir or sweep_dir / TRIALS_DIR / trial.dirname).resolve()),
        ))
    skipped = list(results)
    check_trial_locks(jobs, console)

    parent = _parent_tracker(trials, spec, sweep_dir)
    parent_id = getattr(parent, "run_id", None)
    for job in jobs:
        job.parent_run_id = parent_id
    status = "FAILED"
    ran: list[str] = []
    bars = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        console=console, disable=not progress,
    )
    try:
        with bars:
            done = {"ok": len(skipped), "failed": 0}

            def info() -> str:
                left = len(trials) - done["ok"] - done["failed"]
                return f"[green]{done['ok']} done[/] [red]{done['failed']} failed[/] {left} remaining"

            overall = bars.add_task(spec.name, total=len(trials), completed=len(skipped), info=info())
            running: dict[int, Any] = {}

            def on_event(event: dict[str, Any]) -> None:
                index = event["index"]
                if event["kind"] == "start" and index not in running:
                    running[index] = bars.add_task(
                        f"  {escape(event['label'])}", total=event["steps"], completed=event.get("step", 0), info="")
                elif event["kind"] == "step" and index in running:
                    bars.update(running[index], completed=event["step"], info=f"loss {event['loss']:.3f}")
                elif event["kind"] == "worker-died":
                    if index in running:
                        bars.remove_task(running.pop(index))
                    bars.console.print(f"[yellow]worker died[/] {escape(event['label'])}: "
                                       f"{event['how']}; trying it once more", highlight=False)

            def on_done(result: dict[str, Any]) -> None:
                results[result["hash"]] = result
                ran.append(result["hash"])
                if result["index"] in running:
                    bars.remove_task(running.pop(result["index"]))
                ok = result["status"] == COMPLETED
                done["ok" if ok else "failed"] += 1
                bars.update(overall, completed=done["ok"] + done["failed"], info=info())
                label = escape(result["label"])  # labels and errors may hold [brackets]
                if ok:
                    main = result["task"]["main_metric"]
                    value = result["metrics"].get(main, float("nan"))
                    line = f"[green]done[/]   {label}: {main} {value:.4f} ({result['duration_s']:.0f} s)"
                else:
                    line = f"[red]failed[/] {label}: {escape(result['error'])}"
                if parent is not None:
                    parent.log_metrics({"sweep/completed": done["ok"], "sweep/failed": done["failed"]},
                                       done["ok"] + done["failed"])
                bars.console.print(line, highlight=False)
                if on_result is not None:
                    on_result(result)

            if jobs:
                runner = make_backend(backend, workers=workers, address=address)
                # local workers always report (a worker's death is printed even without bars)
                runner.run(jobs, on_event if progress or backend == "local" else None, on_done)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        console.print(f"interrupted; completed trials are kept in {sweep_dir}", soft_wrap=True)
        raise
    finally:
        if parent is not None:
            parent.finish(status)
    outcome = SweepOutcome(sweep_dir, trials, results, skipped, ran,
                           time.perf_counter() - started, parent_id, getattr(parent, "uri", None))
    meta["last_run"] = {"wall_s": outcome.wall_s, "ran": len(ran), "skipped": len(skipped),
                        "completed": outcome.completed, "failed": outcome.failed,
                        "finished": datetime.now().isoformat(timespec="seconds")}
    meta["mlflow_parent_run_id"] = parent_id
    meta["runs"] = meta["runs"] + [meta["last_run"]]
    write_json(sweep_dir / SWEEP_FILE, meta)
    return outcome
