"""Recall against state size: the report of an associative-recall sweep (MQAR).

Zoology (Arora et al., 2023) plots each mechanism's MQAR accuracy against the size of its
recurrent state: attention's KV cache grows with the context, the state of a linear-time
mechanism does not, and recall is bounded by how much the state can hold. This module
turns a sweep folder made by ``formerlab ablate`` (e.g. ``configs/mqar-study.yaml``) into
that table and plot:

- ``state_bytes(config)``: the bytes of one layer's streaming state for one sequence after
  the task's whole sequence, measured (the mixer of the trial's model is built, in
  float32, and streams ``seq_len`` random tokens; its state's tensors are counted: a KV
  cache by its allocated capacity, which rounds the length up to a multiple of 64
  positions, so it is exact for the study's lengths 64, 128, 256);
- ``recall_rows(sweep_dir)``: one row per completed trial: mechanism, width, length,
  pairs, accuracy, state bytes, train seconds;
- ``write_recall_report(sweep_dir)``: ``recall.md`` (accuracy per mechanism, width and
  setting; state bytes) and ``recall-vs-state.png`` next to the sweep's other reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from formerlab.experiments.report import markdown_table
from formerlab.experiments.results import (
    COMPLETED,
    RESULT_FILE,
    SWEEP_FILE,
    TRIALS_DIR,
    read_result,
)
from formerlab.models.decoder import tensor_bytes
from formerlab.train.build import build_model, build_task
from formerlab.train.config import validate_config

RECALL_REPORT = "recall.md"
RECALL_PLOT = "recall-vs-state.png"


@dataclass(frozen=True)
class RecallRow:
    """One completed trial of a recall sweep; ``mechanism`` is the trial's label on the
    sweep's ``mechanism`` axis (its mechanism name where the sweep has no such axis)."""

    mechanism: str
    width: int
    seq_len: int
    pairs: int
    accuracy: float
    state_bytes: int
    train_s: float

    @property
    def setting(self) -> str:
        return f"L{self.seq_len} P{self.pairs}"


def state_bytes(config: dict[str, Any] | Any) -> int:
    """Bytes of one layer's streaming state (batch 1, float32) after ``seq_len`` tokens.

    ``config``: a trial's run config (a dict or a ``RunConfig``) of a decoder whose mixers
    stream. Every layer of such a model has the same mixer, so the first one is measured.
    """
    cfg = validate_config(config) if isinstance(config, dict) else config
    torch.manual_seed(0)
    model = build_model(cfg, build_task(cfg)).float().eval()
    mixer = model.mixers()[0]
    if not getattr(mixer, "supports_streaming", False):
        raise ValueError(
            f"mechanism {cfg.model.mixer}/{cfg.model.kernel} does not stream: it has no "
            "state to measure"
        )
    n = int(build_task(cfg).max_len)
    with torch.no_grad():
        state = mixer.init_state(1, dtype=torch.float32)
        _, state = mixer.step(torch.randn(1, n, cfg.model.dim), state)
    return tensor_bytes(state)


def recall_rows(sweep_dir: str | Path) -> list[RecallRow]:
    """The completed trials of a recall sweep, as rows (failed and unfinished ones are
    left out: ``formerlab report`` lists them)."""
    trials = Path(sweep_dir) / TRIALS_DIR
    if not trials.is_dir():
        raise FileNotFoundError(
            f"{sweep_dir}: no {TRIALS_DIR}/ folder; pass a sweep folder made by `formerlab ablate`"
        )
    rows = []
    for trial in _trial_dirs(Path(sweep_dir)):
        result = read_result(trial)
        if result is None or result.get("status") != COMPLETED:
            continue
        if "accuracy" not in result.get("metrics", {}):
            raise ValueError(
                f"{trial / RESULT_FILE}: no accuracy in its metrics; a recall report needs a "
                "task scored by accuracy (mqar, recall)"
            )
        config = result["config"]
        options = config["task"]["options"]
        rows.append(RecallRow(
            mechanism=result.get("labels", {}).get("mechanism") or result["mechanism"],
            width=int(config["model"]["dim"]),
            seq_len=int(options["seq_len"]),
            pairs=int(options["num_kv_pairs"]),
            accuracy=float(result["metrics"]["accuracy"]),
            state_bytes=state_bytes(config),
            train_s=float(result.get("train_s", 0.0)),
        ))
    return rows


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    """The trial folders in the sweep's own order (``sweep.json``), else by name."""
    try:
        trials = json.loads((sweep_dir / SWEEP_FILE).read_text())["trials"]
        return [sweep_dir / t["dir"] for t in trials]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return sorted((sweep_dir / TRIALS_DIR).iterdir())


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def recall_table(rows: list[RecallRow]) -> tuple[list[str], list[list[str]]]:
    """Accuracy (%) per mechanism (rows, in first-seen order) and width x setting
    (columns), then the state bytes at the longest setting per width."""
    mechanisms = list(dict.fromkeys(r.mechanism for r in rows))
    widths = sorted({r.width for r in rows})
    settings = sorted({(r.seq_len, r.pairs) for r in rows})
    index = {(r.mechanism, r.width, r.seq_len, r.pairs): r for r in rows}
    header = ["mechanism"]
    header += [f"d={w} L{n} P{p}" for w in widths for n, p in settings]
    header += [f"state d={w} L{settings[-1][0]}" for w in widths]
    cells = []
    for m in mechanisms:
        line = [m]
        for w in widths:
            for n, p in settings:
                r = index.get((m, w, n, p))
                line.append("–" if r is None else f"{100 * r.accuracy:.1f}")
        for w in widths:
            r = index.get((m, w, *settings[-1]))
            line.append("–" if r is None else _size(r.state_bytes))
        cells.append(line)
    return header, cells


def plot_recall(rows: list[RecallRow], path: str | Path) -> Path:
    """Accuracy against state bytes per layer (log x), one panel per setting, one marker
    per mechanism, the widths joined by a line."""
    import matplotlib
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from formerlab.experiments.plots import new_figure, save

    settings = sorted({(r.seq_len, r.pairs) for r in rows})
    mechanisms = list(dict.fromkeys(r.mechanism for r in rows))
    fig = new_figure(4.0 * len(settings) + 1.6, 4.2)
    axes = fig.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    markers = "o^sDv<>pPX*h"
    colours = matplotlib.colormaps["tab20"].colors  # dark shades first, then the light ones
    for ax, (n, p) in zip(axes, settings):
        for i, m in enumerate(mechanisms):
            points = sorted((r.state_bytes, 100 * r.accuracy) for r in rows
                            if r.mechanism == m and (r.seq_len, r.pairs) == (n, p))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker=markers[i % len(markers)], color=colours[(2 * i + i // 10) % 20],
                        label=m, linewidth=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _size(x).replace(".0 ", " ")))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"length {n}, {p} pairs")
        ax.set_xlabel("state per layer (log scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MQAR accuracy (%)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # off the points
    return save(fig, path)


def write_recall_report(sweep_dir: str | Path) -> tuple[Path, Path, list[RecallRow]]:
    """Write ``recall.md`` and ``recall-vs-state.png`` into the sweep folder."""
    sweep_dir = Path(sweep_dir)
    rows = recall_rows(sweep_dir)
    if not rows:
        raise ValueError(f"{sweep_dir}: no completed trial yet; nothing to report")
    header, cells = recall_table(rows)
    text = (
        "# Recall against state size\n\n"
        f"Validation accuracy (%) of {len(rows)} completed trials of `{sweep_dir.name}`; "
        "state: bytes of one layer's streaming state for one sequence after the whole "
        "sequence (float32).\n\n" + markdown_table(header, cells) + "\n"
    )
    report = sweep_dir / RECALL_REPORT
    report.write_text(text)
    plot = plot_recall(rows, sweep_dir / RECALL_PLOT)
    return report, plot, rows
