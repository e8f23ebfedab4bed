"""Pathfinder samples as a picture (the docs' Pathfinder page shows it) and the generation rate.

    .venv/bin/python benchmarks/pathfinder_grid.py              # docs/explanation/pathfinder-grid.png
    .venv/bin/python benchmarks/pathfinder_grid.py --rate 2000  # also time 2,000 images

Top row: eight images as a model sees them (1024 pixel tokens, shown 32 x 32), four with
label 1 (the markers are on one snake) and four with label 0. Bottom row: the same images
coloured from the generator's geometry: the snake carrying the first marker in orange, the
other target snake in blue, distractors in grey, markers in white.

``--rate N`` generates N images of the LRA setting and reports images per second of CPU
time (one core: the generator is NumPy without threads) and wall time, and what that
makes of LRA's 200,000 images.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from formerlab.data import pathfinder

ROOT = Path(__file__).resolve().parents[1]
ORIGIN, OTHER, DISTRACTOR = (1.0, 0.55, 0.1), (0.25, 0.6, 1.0), (0.55, 0.55, 0.55)


def layer(geometry: pathfinder.Geometry, keep: np.ndarray, size: int) -> np.ndarray:
    """Only the paddles ``keep`` (n, P) of ``geometry``, markers left out, as floats 0-1."""
    only = replace(geometry, snake=np.where(keep, geometry.snake, -1).astype(np.int8))
    return pathfinder.render(only, size, markers=False).astype(float) / 255


def coloured(samples: pathfinder.Samples, size: int) -> np.ndarray:
    """(n, size, size, 3) RGB: the two target snakes, distractors and markers apart."""
    g = samples.geometry
    origin = g.marker_snake[:, :1]
    parts = [
        (layer(g, g.snake == origin, size), ORIGIN),
        (layer(g, (g.snake < 2) & (g.snake >= 0) & (g.snake != origin), size), OTHER),
        (layer(g, g.snake >= 2, size), DISTRACTOR),
    ]
    rgb = np.zeros((len(g.snake), size, size, 3))
    for intensity, colour in parts:
        rgb = np.maximum(rgb, intensity[..., None] * np.array(colour))
    markers = pathfinder.render(replace(g, snake=np.full_like(g.snake, -1)), size) / 255
    return np.maximum(rgb, markers[..., None])


def grid(out: Path, seed: int, columns: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = pathfinder.PathfinderConfig(seed=seed)
    drawn = pathfinder.generate(cfg, 4 * columns, "val", geometry=True)
    # label 1 first, then label 0
    order = np.concatenate(
        [
            np.flatnonzero(drawn.labels == 1)[: columns // 2],
            np.flatnonzero(drawn.labels == 0)[: columns - columns // 2],
        ]
    )
    picked = drawn.select(order)
    colours = coloured(picked, cfg.image_size)
    fig, axes = plt.subplots(2, columns, figsize=(1.6 * columns, 3.6))
    for k in range(columns):
        axes[0, k].imshow(picked.images[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[0, k].set_title(f"label {picked.labels[k]}", fontsize=10)
        axes[1, k].imshow(colours[k], interpolation="nearest")
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("pixels", fontsize=10)
    axes[1, 0].set_ylabel("geometry", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def rate(count: int, seed: int) -> None:
    cfg = pathfinder.PathfinderConfig(seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    samples = pathfinder.generate(cfg, count, "train")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_cpu = count / cpu
    print(
        f"{count} images in {cpu:.1f} s CPU ({per_cpu:.0f} images/s) and {wall:.1f} s wall; "
        f"200,000 images: {200_000 / per_cpu / 60:.1f} min of one core; "
        f"{samples.labels.mean():.3f} of the labels are 1"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/explanation/pathfinder-grid.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--rate", type=int, default=0, help="also time generating this many")
    args = parser.parse_args()
    grid(args.out, args.seed, args.columns)
    if args.rate:
        rate(args.rate, args.seed)


if __name__ == "__main__":
    main()
