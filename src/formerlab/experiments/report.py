"""``formerlab report SWEEP_DIR``: tables and plots from the trial results on disk.

Reads ``sweep.json`` and each trial's ``result.json`` (no MLflow needed) and writes
``report.md`` plus PNGs into the sweep folder: per task a table (mechanism x main metric
mean ± std over seeds, loss, baseline, parameters, tokens/s, work peak memory, iteration
counts of pseudoinverses / solvers when the model reports them), loss curves, a metric bar
chart and, when the sweep varies the sequence length, time and memory against N.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formerlab.experiments import plots
from formerlab.experiments.results import COMPLETED, FAILED, SWEEP_FILE, read_result

REPORT_FILE = "report.md"
#: per-trial numbers stored at the top level of result.json (the rest are in "metrics")
RESULT_KEYS = ("tokens_per_s", "work_memory_mb", "parameters")
PENDING = "pending"


@dataclass
class Row:
    """One table row: the trials of a setting that differ only by seed."""

    task: str
    mechanism: str
    setting: str
    seq_len: int | None
    main_metric: str
    higher_is_better: bool
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("status") == COMPLETED]

    def values(self, key: str) -> list[float]:
        out = []
        for r in self.completed:
            value = r.get(key) if key in RESULT_KEYS else r["metrics"].get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append(float(value))
        return out

    def mean_std(self, key: str) -> tuple[float | None, float | None]:
        values = self.values(key)
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    def baseline(self) -> float | None:
        for r in self.completed:
            value = r["task"].get("baseline", {}).get(self.main_metric)
            if value is not None:
                return float(value)
        return None

    def diagnostics(self) -> dict[str, float]:
        """Mean over the completed trials of the iteration counts and residuals that
        pseudoinverses and solvers report (their means, not their maxima)."""
        sums: dict[str, list[float]] = {}
        for r in self.completed:
            for key, value in (r.get("diagnostics") or {}).items():
                wanted = ("iteration" in key or "residual" in key) and "max" not in key
                if wanted and isinstance(value, (int, float)):
                    sums.setdefault(key, []).append(float(value))
        return {k: statistics.fmean(v) for k, v in sums.items()}

    def ms_per_step(self) -> float | None:
        values = [1e3 * r["train_s"] / r["steps"] for r in self.completed if r.get("train_s") and r.get("steps")]
        return statistics.fmean(values) if values else None

    def loss_curve(self) -> tuple[list[int], list[float]]:
        """Training loss averaged over seeds at the steps all of them logged."""
        per_step: dict[int, list[float]] = {}
        for r in self.completed:
            for point in r.get("history", []):
                per_step.setdefault(int(point["step"]), []).append(float(point["loss"]))
        count = len(self.completed)
        steps = sorted(s for s, v in per_step.items() if len(v) == count)
        return steps, [statistics.fmean(per_step[s]) for s in steps]

    def status(self) -> str:
        counts = {s: sum(r.get("status") == s for r in self.results) for s in (COMPLETED, FAILED, PENDING)}
        parts = [f"{counts[COMPLETED]} ok"]
        parts += [f"{counts[s]} {s}" for s in (FAILED, PENDING) if counts[s]]
        return ", ".join(parts)


def load_results(sweep_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(sweep.json, one dict per trial in sweep order)``; trials not run yet are
    ``{"status": "pending", ...}`` so a report always lists every trial."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(sweep_dir)!r} is not a sweep folder (no {SWEEP_FILE}); pass the folder "
            "that `formerlab ablate` printed"
        )
    meta = json.loads(path.read_text())
    results = []
    for trial in meta["trials"]:
        result = read_result(sweep_dir / trial["dir"])
        if result is None or result.get("hash") != trial["hash"]:
            result = {**trial, "status": PENDING,
                      "task": {"name": trial["config"]["task"]["name"], "main_metric": None}}
        result.setdefault("mechanism", trial["mechanism"])
        result.setdefault("labels", trial["labels"])
        results.append(result)
    return meta, results


def _setting_key(config: dict[str, Any]) -> str:
    neutral = {k: v for k, v in config.items() if k not in ("seed", "name", "runs_dir", "tracking")}
    return json.dumps(neutral, sort_keys=True)


def build_rows(meta: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, list[Row]]:
    """Rows grouped by task name, in sweep order."""
    setting_axes = [a["name"] for a in meta.get("axes", [])
                    if a.get("task") and "task.name" not in a.get("keys", [])]
    tasks: dict[str, dict[str, Row]] = {}
    for r in results:
        task = r["task"]
        name = task.get("name") or r["config"]["task"]["name"]
        rows = tasks.setdefault(name, {})
        key = _setting_key(r["config"])
        if key not in rows:
            setting = " ".join(r["labels"][a] for a in setting_axes if a in r["labels"])
            rows[key] = Row(name, r["mechanism"], setting, task.get("seq_len"),
                            task.get("main_metric") or "accuracy", task.get("higher_is_better", True))
        row = rows[key]
        row.results.append(r)
        # pending/failed rows learn the task's facts from any completed sibling
        if r.get("status") == COMPLETED:
            row.main_metric, row.higher_is_better = task["main_metric"], task["higher_is_better"]
            row.seq_len = task.get("seq_len")
    out = {name: list(rows.values()) for name, rows in tasks.items()}
    for rows in out.values():  # one metric per table: the task's
        metric = next((r.main_metric for r in rows if r.completed), rows[0].main_metric)
        for row in rows:
            row.main_metric = metric
    return out


# --- formatting -------------------------------------------------------------------------


def _is_rate(metric: str) -> bool:
    return any(word in metric for word in ("accuracy", "match", "f1"))


def fmt_metric(metric: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    if _is_rate(metric):
        text = f"{100 * mean:.1f}"
        return f"{text} ± {100 * std:.1f} %" if std is not None else f"{text} %"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def _si(value: float | None) -> str:
    """``103242`` -> ``103k``, ``17930`` -> ``17.9k`` (the terminal table's width)."""
    if value is None:
        return "–"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            scaled = value / factor
            return f"{scaled:.0f}{suffix}" if scaled >= 100 else f"{scaled:.1f}{suffix}"
    return f"{value:.0f}"


def _short(key: str) -> str:
    """``pinv_iterations`` -> ``pinv it``, ``deq_residual`` -> ``deq res``."""
    return key.replace("iterations", "it").replace("residual", "res").replace("_", " ")


def table_rows(rows: list[Row], compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one task's table. ``compact`` (the terminal) keeps the columns
    that fit 80 characters: no val loss, no memory increase, short headers; the seed and
    status columns only when they say something (several seeds, a failed or pending trial)."""
    metric = rows[0].main_metric
    diag_keys = sorted({k for row in rows for k in row.diagnostics()})
    show_setting = any(row.setting for row in rows)
    # N only when it varies and no task-option column (e.g. length=64) already says so
    show_n = len({row.seq_len for row in rows}) > 1 and not show_setting
    show_seeds = not compact or any(len(row.completed) != 1 for row in rows)
    show_status = not compact or any(len(row.completed) != len(row.results) for row in rows)
    header = ["mechanism"] + (["setting"] if show_setting else []) + (["N"] if show_n else [])
    if compact:
        header += [metric, "baseline", "params", "tok/s", "work MiB", "ms/step"]
        header += [_short(k) for k in diag_keys]
    else:
        header += [f"{metric} (mean ± std)"] + (["val loss"] if metric != "loss" else [])
        header += [f"baseline {metric}", "params", "train tokens/s", "work peak MiB", "ms/step"]
        header += [k.replace("_", " ") for k in diag_keys]
    header += (["seeds"] if show_seeds else []) + (["trials"] if show_status else [])
    cells = []
    for row in rows:
        line = [row.mechanism] + ([row.setting] if show_setting else [])
        line += [str(row.seq_len)] if show_n else []
        line.append(fmt_metric(metric, *row.mean_std(metric)))
        if metric != "loss" and not compact:
            line.append(fmt_metric("loss", *row.mean_std("loss")))
        baseline = row.baseline()
        line.append(fmt_metric(metric, baseline, None) if baseline is not None else "–")
        params = row.values("parameters")
        number = _si if compact else _fmt
        line.append(number(params[0] if params else None))
        line.append(number(row.mean_std("tokens_per_s")[0]))
        line.append(_fmt(row.mean_std("work_memory_mb")[0]))  # results before it: "–"
        line.append(_fmt(row.ms_per_step(), ".1f"))
        diagnostics = row.diagnostics()
        line += [_fmt(diagnostics.get(k), ".3g") for k in diag_keys]
        line += [str(len(row.completed))] if show_seeds else []
        line += [row.status()] if show_status else []
        cells.append(line)
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(clean(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in line) + " |" for line in cells]
    return "\n".join(lines)


# --- the report -------------------------------------------------------------------------


@dataclass
class Report:
    """What ``write_report`` produced."""

    path: Path
    plots: list[Path]
    tables: dict[str, tuple[list[str], list[list[str]]]]
    counts: dict[str, int]
    rows: dict[str, list[Row]] = field(default_factory=dict)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_report(sweep_dir: str | Path) -> Report:
    """Write ``report.md`` and the PNGs into ``sweep_dir``; return what was written."""
    sweep_dir = Path(sweep_dir)
    meta, results = load_results(sweep_dir)
    grouped = build_rows(meta, results)
    counts = {s: sum(r.get("status") == s for r in results) for s in (COMPLETED, FAILED, PENDING)}
    wall = sum(run.get("wall_s", 0.0) for run in meta.get("runs", []))
    lines = [f"# Sweep report: {meta['name']}", ""]
    if meta.get("description"):
        lines += [meta["description"].strip(), ""]
    lines += [
        f"- sweep folder: `{sweep_dir}`",
        f"- trials: {len(results)} ({counts[COMPLETED]} completed, {counts[FAILED]} failed, "
        f"{counts[PENDING]} pending)",
        f"- sweep wall time: {wall:.0f} s over {len(meta.get('runs', []))} invocation(s), "
        f"backend {meta.get('backend')}, workers {meta.get('workers') or 1}",
        "- metric: mean ± std over seeds on the validation split at the last step; "
        "baseline: the task's chance / majority predictor; tokens/s: training throughput; "
        "work peak MiB: the peak memory of the trial's work (model, optimizer state, "
        "activations) above what its process held before the model was built: peak "
        "allocated tensor memory on CUDA, peak resident memory on CPU (not the memory of a "
        "Python process with torch loaded); "
        "ms/step: wall time of the run divided by its steps (evaluation included)",
        "",
    ]
    written: list[Path] = []
    tables = {}
    for task, rows in grouped.items():
        header, cells = table_rows(rows)
        tables[task] = (header, cells)
        metric = rows[0].main_metric
        lines += [f"## {task}", "", markdown_table(header, cells), ""]
        done = [row for row in rows if row.completed]
        if not done:
            lines += ["(no completed trial yet: no plots)", ""]
            continue
        name = lambda row: row.mechanism + (f" {row.setting}" if row.setting else "")  # noqa: E731
        curves = plots.loss_curves(
            sweep_dir / f"{_slug(task)}-loss.png", f"{task}: training loss",
            {name(row): row.loss_curve() for row in done})
        means = [row.mean_std(metric) for row in done]
        bars = plots.metric_bars(
            sweep_dir / f"{_slug(task)}-{_slug(metric)}.png", f"{task}: validation {metric}",
            [name(row) for row in done], [m if m is not None else math.nan for m, _ in means],
            [s for _, s in means], metric, done[0].baseline())
        written += [curves, bars]
        lines += [f"![{task} loss curves]({curves.name})", "", f"![{task} {metric}]({bars.name})", ""]
        lengths = {row.seq_len for row in done if row.seq_len}
        if len(lengths) > 1:
            series: dict[str, list[tuple[float, float, float]]] = {}
            for row in done:
                ms, mem = row.ms_per_step(), row.mean_std("work_memory_mb")[0]
                if row.seq_len and ms and mem:
                    series.setdefault(row.mechanism, []).append((row.seq_len, ms, mem))
            scale = plots.scaling(
                sweep_dir / f"{_slug(task)}-scaling.png", f"{task}: cost against sequence length",
                series, memory_label="work peak memory (MiB)")
            written.append(scale)
            lines += [f"![{task} time and memory against N]({scale.name})", ""]
    failed = [r for r in results if r.get("status") == FAILED]
    if failed:
        lines += ["## Failed trials", "", markdown_table(
            ["#", "trial", "error"],
            [[str(r["index"]), r["label"], r.get("error", "").splitlines()[0][:300]] for r in failed]), ""]
    lines += ["## All trials", "", markdown_table(
        ["#", "trial", "task", "mechanism", "seed", "status", "main metric", "duration s", "folder"],
        [[str(r["index"]), r["label"], r["task"].get("name") or "", r["mechanism"],
          str(r["config"].get("seed", "")), r.get("status", ""), _main_value(r),
          f"{r['duration_s']:.0f}" if r.get("duration_s") else "–",
          f"`{Path(r['dir']).name}`"] for r in results]), ""]
    path = sweep_dir / REPORT_FILE
    path.write_text("\n".join(lines))
    return Report(path, written, tables, counts, grouped)


def _main_value(result: dict[str, Any]) -> str:
    if result.get("status") != COMPLETED:
        return "–"
    metric = result["task"]["main_metric"]
    value = result["metrics"].get(metric)
    return "–" if value is None else f"{metric} {value:.4f}"
