"""Pathfinder: the label rule checked by connectivity, markers, clearances, rendering,
balance, determinism, the disk cache, option errors and a tiny training run."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from formerlab import data
from formerlab.data import pathfinder as pf
from formerlab.data.pathfinder import Pathfinder, PathfinderConfig

SIZE = 32
CFG = PathfinderConfig(seed=3)


@pytest.fixture(scope="module")
def sample() -> pf.Samples:
    return pf.generate(CFG, 64, "val", geometry=True)


# --- independent references -------------------------------------------------------------


def dense_points(segment: np.ndarray, n: int = 41) -> np.ndarray:
    """``n`` evenly spaced points along a (2, 2) segment."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return segment[0] + t * (segment[1] - segment[0])


def sampled_distance(s: np.ndarray, t: np.ndarray) -> float:
    """Distance between two segments from dense point samples (>= the true distance, and
    at most 1/80 of the longer segment above it)."""
    a, b = dense_points(s.reshape(2, 2)), dense_points(t.reshape(2, 2))
    return float(np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min())


def reference_image(geometry: pf.Geometry, i: int) -> np.ndarray:
    """Image ``i`` drawn shape by shape over the whole grid: each shape's coverage (2 x 2
    sub-samples per pixel, an edge ramp one sub-pixel wide) box-averaged and scaled by its
    contrast, then the shapes max-blended, clipped and rounded (as the published code
    blends its separately resized paddles)."""
    sub = (np.arange(2 * SIZE) + 0.5) / 2  # sub-pixel centres
    y, x = np.meshgrid(sub, sub, indexing="ij")

    def pixels(coverage):
        return coverage.reshape(SIZE, 2, SIZE, 2).mean((1, 3))

    canvas = np.zeros((SIZE, SIZE))
    for slot in np.flatnonzero(geometry.snake[i] >= 0):
        (y0, x0), (y1, x1) = geometry.paddles[i, slot]
        t = np.clip(
            ((y - y0) * (y1 - y0) + (x - x0) * (x1 - x0)) / ((y1 - y0) ** 2 + (x1 - x0) ** 2), 0, 1
        )
        d = np.hypot(y - (y0 + t * (y1 - y0)), x - (x0 + t * (x1 - x0)))
        contrast = 1.5 if geometry.snake[i, slot] < 2 else 2.0
        canvas = np.maximum(canvas, contrast * pixels(np.clip((0.25 + 0.25 - d) / 0.5, 0, 1)))
    for cy, cx in geometry.markers[i]:
        d = np.hypot(y - cy, x - cx)
        canvas = np.maximum(canvas, pixels(np.clip((1.5 + 0.25 - d) / 0.5, 0, 1)))
    return np.rint(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def markers_connected(geometry: pf.Geometry, i: int, scale: int = 6) -> bool:
    """Whether the two markers of image ``i`` are joined by ink, at ``scale`` x resolution.

    The ink is every snake drawn as a solid polyline (its paddles and the dashes' gaps
    between them, stroke half-width 0.25 px, the paddles' own) plus the marker discs;
    components are 8-connected. Sound because (checked in ``test_snakes_are_dashed_
    contours_that_keep_their_distance``) consecutive paddles of a snake are at most 2 px
    apart, while paddles of different snakes keep 2 px: then the gaps of one snake keep
    sqrt(3) px from every other snake (a gap has length <= 2 and ends on paddles), a
    marker centre keeps 3.5 px from other snakes' paddles, and two strokes can only touch
    on this grid closer than 0.25 + 0.25 + sqrt(2) / scale < 0.75 px.
    """
    cells = (np.arange(SIZE * scale) + 0.5) / scale
    y, x = np.meshgrid(cells, cells, indexing="ij")
    ink = np.zeros(y.shape, dtype=bool)
    for snake in np.unique(geometry.snake[i][geometry.snake[i] >= 0]):
        chain = geometry.paddles[i, geometry.snake[i] == snake].reshape(-1, 2)  # t0 h0 t1 h1
        for (y0, x0), (y1, x1) in zip(chain[:-1], chain[1:]):
            t = np.clip(
                ((y - y0) * (y1 - y0) + (x - x0) * (x1 - x0))
                / max((y1 - y0) ** 2 + (x1 - x0) ** 2, 1e-12),
                0,
                1,
            )
            ink |= np.hypot(y - (y0 + t * (y1 - y0)), x - (x0 + t * (x1 - x0))) <= 0.25
    for cy, cx in geometry.markers[i]:
        ink |= np.hypot(y - cy, x - cx) <= 1.5
    components, _ = ndimage.label(ink, structure=np.ones((3, 3)))
    (ay, ax), (by, bx) = (np.floor(m * scale).astype(int) for m in geometry.markers[i])
    assert components[ay, ax] and components[by, bx], "a marker centre is not inked"
    return bool(components[ay, ax] == components[by, bx])


# --- the label rule ---------------------------------------------------------------------


def test_label_is_marker_connectivity_over_the_drawn_snakes(sample) -> None:
    geometry = sample.geometry
    for i in range(32):
        connected = markers_connected(geometry, i)
        assert connected == bool(sample.labels[i]), f"image {i}: label {sample.labels[i]}"
        origin, terminal = geometry.marker_snake[i]
        assert (origin == terminal) == connected


def test_images_are_their_geometry_drawn(sample) -> None:
    """The connectivity check reads the geometry: the images show exactly that geometry."""
    for i in range(16):
        diff = np.abs(reference_image(sample.geometry, i).astype(int) - sample.images[i])
        assert diff.max() <= 1, f"image {i} differs from its geometry by {diff.max()}"


def test_snakes_are_dashed_contours_that_keep_their_distance(sample) -> None:
    g = sample.geometry
    for i in range(24):
        used = np.flatnonzero(g.snake[i] >= 0)
        for snake in np.unique(g.snake[i, used]):
            chain = g.paddles[i, g.snake[i] == snake]  # (paddles, 2, 2) in growth order
            lengths = np.linalg.norm(chain[:, 1] - chain[:, 0], axis=-1)
            np.testing.assert_allclose(lengths, 2.0, rtol=1e-9)
            gaps = np.linalg.norm(chain[1:, 0] - chain[:-1, 1], axis=-1)
            assert gaps.max() <= 2.0 + 1e-9 and gaps.min() > 0.5
            direction = (chain[:, 1] - chain[:, 0]) / lengths[:, None]
            turns = np.degrees(np.arccos(np.clip((direction[1:] * direction[:-1]).sum(-1), -1, 1)))
            assert turns.max() < 90.0  # continuity 1: the turn weight is 0 at 90 degrees
        # every pair of paddles but consecutive ones of a snake: >= 2 px apart (exact
        # distances; segment_distance is checked against dense sampling below)
        segments = g.paddles[i, used].reshape(-1, 4)
        gaps = pf.segment_distance(segments[:, None], segments[None])
        owner = g.snake[i, used]
        order = np.array(
            [np.flatnonzero(g.snake[i] == o).tolist().index(slot) for o, slot in zip(owner, used)]
        )
        exempt = (owner[:, None] == owner[None]) & (np.abs(order[:, None] - order[None]) <= 1)
        assert gaps[~exempt].min() >= 2.0 - 1e-9
        for k, centre in enumerate(g.markers[i]):
            foreign = segments[owner != g.marker_snake[i, k]]
            near = pf.point_segment_distance(centre, foreign[:, :2], foreign[:, 2:]).min()
            assert near >= 3.5 - 1e-9  # marker radius 1.5 + 2 px
        assert np.linalg.norm(g.markers[i, 0] - g.markers[i, 1]) >= 5.0


def test_markers_sit_on_the_ends_of_their_snakes(sample) -> None:
    g = sample.geometry
    length = CFG.contour_length
    for i in range(len(sample.labels)):
        origin, terminal = g.marker_snake[i]
        first = g.paddles[i, g.snake[i] == origin][0, 0]  # tail of the first paddle
        last = g.paddles[i, g.snake[i] == terminal][length - 1, 1]  # head of the last
        np.testing.assert_array_equal(g.markers[i, 0], np.floor(first) + 0.5)
        np.testing.assert_array_equal(g.markers[i, 1], np.floor(last) + 0.5)


def test_two_distinct_marker_blobs_in_every_image(sample) -> None:
    """From the pixels alone: a marker is a plus of five pixels >= 240 (a disc of radius
    1.5 on a pixel centre); thin paddles never hold one."""
    cross = ndimage.generate_binary_structure(2, 1)
    for image, markers in zip(sample.images, sample.geometry.markers):
        blobs = ndimage.binary_opening(image >= 240, structure=cross)
        components, count = ndimage.label(blobs, structure=np.ones((3, 3)))
        assert count == 2
        centres = np.array(ndimage.center_of_mass(blobs, components, [1, 2])) + 0.5
        assert np.linalg.norm(centres[:, None] - markers[None], axis=-1).min(1).max() < 1e-9
        assert np.linalg.norm(centres[0] - centres[1]) >= 5.0


def test_image_statistics(sample) -> None:
    images, g = sample.images, sample.geometry
    assert images.dtype == np.uint8 and images.shape == (64, SIZE, SIZE)
    assert (images.reshape(64, -1).max(1) == 255).all()  # the marker centres
    lit = (images > 0).reshape(64, -1).mean(1)
    assert lit.min() > 0.1 and lit.max() < 0.5, (lit.min(), lit.max())
    assert 10 < images.mean() < 60
    for edge in (images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]):
        assert (edge == 0).all()  # the 1 px padding
    for i in range(64):
        counts = np.bincount(g.snake[i][g.snake[i] >= 0])
        assert counts[0] == counts[1] == CFG.contour_length  # two snakes of 14 paddles
        distractors = counts[2:]
        assert set(distractors.tolist()) <= {0, CFG.distractor_length}
    placed = (
        np.stack([np.bincount(s[s >= 2], minlength=2 + CFG.num_distractors)[2:] for s in g.snake])
        > 0
    )
    assert placed.sum(1).mean() > 3.5  # most of the 5 distractors find room


# --- geometry helpers against brute force -----------------------------------------------

coordinate = st.floats(0.0, 10.0, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(st.lists(coordinate, min_size=8, max_size=8))
def test_segment_distance_matches_dense_sampling(values) -> None:
    s, t = np.array(values[:4]), np.array(values[4:])
    if np.linalg.norm(s[2:] - s[:2]) < 1e-3 or np.linalg.norm(t[2:] - t[:2]) < 1e-3:
        return
    exact = float(pf.segment_distance(s, t))
    sampled = sampled_distance(s, t)
    longest = max(np.linalg.norm(s[2:] - s[:2]), np.linalg.norm(t[2:] - t[:2]))
    assert exact <= sampled + 1e-9
    assert sampled - exact <= longest / 40 + 1e-9


@pytest.mark.parametrize("spread", ["pivot", "seeds"])
def test_clearance_screen_agrees_with_all_pairs(spread) -> None:
    """Both screening paths of ``_clear_of`` give what checking every pair gives."""
    rng = np.random.default_rng(7)
    n, k, f = 64, 12, 20

    def paddles(centre, radius, shape):
        tail = centre + rng.uniform(-radius, radius, (*shape, 2))
        return np.concatenate([tail, tail + 2.0 * pf._unit(rng.uniform(-np.pi, np.pi, shape))], -1)

    existing = paddles(np.array([16.0, 16.0]), 10.0, (n, f))
    radius = 1.5 if spread == "pivot" else 12.0
    candidates = paddles(rng.uniform(10, 22, (n, 1, 2)), radius, (n, k))
    skip = rng.integers(0, f, n)
    got = pf._clear_of(candidates, existing, skip)
    dist = pf.segment_distance(candidates[:, :, None], existing[:, None])
    dist[np.arange(n), :, skip] = np.inf
    want = dist.min(-1) >= pf.PADDLE_CLEARANCE
    np.testing.assert_array_equal(got, want)
    assert 0.1 < want.mean() < 0.9  # both outcomes occur


# --- splits, balance, determinism -------------------------------------------------------


@pytest.mark.parametrize("count", [40, 31])
def test_labels_are_balanced(count) -> None:
    labels = pf.generate(PathfinderConfig(seed=1), count, "test").labels
    assert set(labels.tolist()) <= {0, 1}
    assert labels.sum() in {count // 2, (count + 1) // 2}
    if count % 2 == 0:
        assert labels.sum() == count // 2


def test_same_seed_same_bytes_and_streams_differ() -> None:
    cfg = PathfinderConfig(seed=11)
    a, b = pf.generate(cfg, 16, "train"), pf.generate(cfg, 16, "train")
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.labels, b.labels)
    other_seed = pf.generate(PathfinderConfig(seed=12), 16, "train")
    val = pf.generate(cfg, 16, "val")
    seen = {image.tobytes() for image in a.images}
    assert not seen & {image.tobytes() for image in other_seed.images}
    assert not seen & {image.tobytes() for image in val.images}
    assert len(seen) == 16


def test_task_batches_and_eval_walk(monkeypatch) -> None:
    monkeypatch.setattr(pf, "_POOLS", {})
    task = data.build("pathfinder", train_size=16, val_size=10, test_size=6, seed=4)
    assert task.kind == "encoder" and task.num_classes == 2 and task.vocab_size == 256
    assert task.max_len == 1024 and task.splits == ("train", "val", "test")
    images, labels = task.images("train")
    b = task.batch("train", 8, torch.Generator().manual_seed(0))
    assert (
        b.inputs.shape == (8, 1024) and b.inputs.dtype == torch.int64 and b.attention_mask is None
    )
    assert b.inputs.min() >= 0 and b.inputs.max() <= 255
    flat = images.reshape(16, -1).long()
    for tokens, label in zip(b.inputs, b.targets):
        match = (flat == tokens).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(labels[match[0]]) == int(label)
    val_labels = task.images("val")[1]
    walked = torch.cat([x.targets for x in task.eval_batches("val", 4, max_batches=10)])
    assert walked.tolist() == val_labels.tolist()  # 10 images in order, none twice
    assert len(list(task.eval_batches("test", 4, max_batches=10))) == 2
    no_test = data.build("pathfinder", train_size=4, val_size=2, test_size=0)
    with pytest.raises(ValueError, match="split"):
        no_test.batch("test", 2, torch.Generator())
    assert task.decode([0, 17, 255]) == "0 17 255"


def test_a_tiny_config_trains(tmp_path) -> None:
    from formerlab.train import load_config, train

    cfg = load_config(
        None,
        [
            "task.name=pathfinder",
            "task.options={train_size: 16, val_size: 8, test_size: 0}",
            "model.dim=16",
            "model.depth=1",
            "model.heads=2",
            "train.steps=2",
            "train.batch_size=4",
            "train.warmup=1",
            "train.eval_every=2",
            "train.eval_batches=2",
            "train.log_every=1",
            f"runs_dir={tmp_path}",
            "tracking=none",
        ],
    )
    result = train(cfg, progress=False)
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    scores = result.evals[-1]["eval"]
    assert math.isfinite(scores["loss"])
    assert (scores["accuracy"] * 8) % 1 == 0  # the 8 validation images, each once


# --- disk cache -------------------------------------------------------------------------


OPTIONS = dict(train_size=12, val_size=4, test_size=0, seed=9)


def test_disk_cache_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pf, "_POOLS", {})
    first = Pathfinder(**OPTIONS, cache_dir=tmp_path)
    images, labels = first.images("train")
    path = first.cache_file("train")
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["count"] == 12 and record["options"]["seed"] == 9 and len(record["sha256"]) == 64
    monkeypatch.setattr(pf, "_POOLS", {})
    monkeypatch.setattr(pf, "generate", None)  # a second task must load, not generate
    again = Pathfinder(**OPTIONS, cache_dir=tmp_path).images("train")
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)


@pytest.mark.parametrize("damage", ["pixel", "truncate", "sidecar"])
def test_corrupt_cache_is_detected_and_regenerated(tmp_path, monkeypatch, damage) -> None:
    monkeypatch.setattr(pf, "_POOLS", {})
    task = Pathfinder(**OPTIONS, cache_dir=tmp_path)
    images, labels = (t.clone() for t in task.images("train"))
    path = task.cache_file("train")
    if damage == "pixel":  # a valid file whose contents changed
        changed = images.numpy().copy()
        changed[0, 5, 5] ^= 1
        np.savez_compressed(path, images=changed, labels=labels.numpy())
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    else:
        sidecar = path.with_suffix(".json")
        sidecar.write_text(sidecar.read_text().replace('"seed": 9', '"seed": 8'))
    with pytest.raises(pf.CorruptCacheError, match=str(path.name)):
        pf.load_split(path, task._meta("train"))
    monkeypatch.setattr(pf, "_POOLS", {})
    with pytest.warns(UserWarning, match="corrupt, regenerating"):
        again = Pathfinder(**OPTIONS, cache_dir=tmp_path).images("train")
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repaired = pf.load_split(path, task._meta("train"))  # rewritten, verifies again
    assert np.array_equal(repaired[0], images.numpy())


# --- options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(image_size=16), "image_size"),
        (dict(image_size=32.0), "image_size"),
        (dict(contour_length=1), "contour_length"),
        (dict(contour_length=True), "contour_length"),
        (dict(distractor_length=0), "distractor_length"),
        (dict(distractor_length=15), "distractor_length"),
        (dict(num_distractors=-1), "num_distractors"),
        (dict(train_size=0), "train_size"),
        (dict(val_size=0), "val_size"),
        (dict(test_size=-1), "test_size"),
        (dict(seed=-1), "seed"),
        (dict(seed="0"), "seed"),
    ],
)
def test_bad_options_name_the_argument(options, named) -> None:
    with pytest.raises(ValueError, match=rf"^{named}="):
        data.build("pathfinder", **options)


def test_options_that_cannot_fit_fail_clearly() -> None:
    with pytest.raises(ValueError, match="could not draw .* the snakes do not fit"):
        pf.generate(PathfinderConfig(contour_length=60), 4)
