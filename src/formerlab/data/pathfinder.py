"""Pathfinder (Linsley et al., 2018) as in Long Range Arena's Pathfinder-32 (Tay et al., 2021).

An image shows two target *snakes* (contours of dashed short line segments, "paddles"),
a few short distractor snakes, and two circular markers. The label is 1 when both markers
sit on the ends of the same snake and 0 when they sit on two different snakes. The image
is flattened to ``image_size ** 2`` pixel tokens (intensity 0-255), so a model has to trace
a curve across the whole sequence: LRA's long-range spatial task.

The generator follows the published algorithm ("Learning long-range spatial dependencies
with horizontal gated recurrent units", Linsley et al., NeurIPS 2018; its Pathfinder
challenge code) with LRA's Pathfinder-32 settings (``paddle_length=2``,
``paddle_margin=1``, ``paddle_thickness=0.5``, ``marker_radius=1.5``,
``contour_length=14``, ``seed_distance=7``, ``continuity=1.0``, ``distractor_length =
contour_length // 3``, ``num_distractor_snakes = 20 // distractor_length``,
``antialias_scale=2``, snake contrast 2 x paddle contrast 0.75):

1. Two seed paddles: the first tail uniform in the central square ``[2 d, S - 2 d]``
   (``d`` = seed distance), the second tail ``d`` pixels away in a uniform direction;
   both orientations uniform.
2. The two snakes grow alternately, one paddle per step. The next paddle starts a margin
   past a pivot one margin beyond the last head (a gap of at most ``2 * margin``: the
   contour is dashed) and turns by an angle drawn with weight
   ``cos(min(continuity * |turn|, pi / 2)) ** 2`` among the turns whose paddle passes the
   occupancy check: it keeps ``2 * margin`` from every earlier paddle except its
   predecessor, and stays ``margin`` inside the ``padding`` frame.
3. Distractor snakes (``distractor_length`` paddles each) grow from uniform random seeds
   under the same rules; one that finds no room after a few tries is left out, as in the
   published code.
4. A marker (a disc centred on the pixel that holds the point) goes on the first tail of
   one target snake, chosen at random, and one on the last head of the same snake
   (label 1) or of the other one (label 0).

Where this generator differs from the published code: so that a label can be checked from
the geometry (see the tests), the occupancy check also covers the other target snake's
newest paddle, no paddle of another snake comes within ``marker_radius + 2 * margin`` of a
marker's centre, and the two markers keep ``2 * (marker_radius + margin)`` apart (an image
breaking these is redrawn, like one whose snakes meet a dead end: about one try in 25
succeeds at these settings, and a failing try stops early). Paddle positions are not
rounded to pixels. Rendering samples ``antialias_scale ** 2`` points per pixel with a
linear edge ramp and box-averages them (the published code draws with PIL and resizes
with a Lanczos filter). Intensities are as published: target paddles at contrast
1.5, distractor paddles at 2.0 (both clipped to 1), markers at 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formerlab.data.base import Batch, PooledSplits, Task
from formerlab.data.registry import register
from formerlab.errors import check_choice, check_positive_int

# LRA Pathfinder-32 (the settings its TFDS builder lists for the published generator)
PADDLE_LENGTH = 2.0
PADDLE_MARGIN = 1.0
PADDLE_THICKNESS = 0.5
MARKER_RADIUS = 1.5
SEED_DISTANCE = 7.0
CONTINUITY = 1.0
PADDING = 1.0
ANTIALIAS = 2
TARGET_CONTRAST = 2.0 * 0.75  # snake contrast x paddle contrast
DISTRACTOR_CONTRAST = 2.0
MARKER_CONTRAST = 1.0

# clearances (pixels): paddle-paddle, marker centre-foreign paddle, marker-marker
PADDLE_CLEARANCE = 2 * PADDLE_MARGIN
MARKER_CLEARANCE = MARKER_RADIUS + 2 * PADDLE_MARGIN
MARKER_SEPARATION = 2 * (MARKER_RADIUS + PADDLE_MARGIN)

VOCAB = [str(i) for i in range(256)]
SPLITS = ("train", "val", "test")
MIN_IMAGE_SIZE = 32

_TURNS = 12  # candidate turn angles per growth step (stratified over (-90, 90) degrees)
_SEED_TRIES = 16  # candidate seed placements drawn at once
_DISTRACTOR_TRIES = 8  # regrowths of a distractor snake before it is left out
_CHUNK = 1024  # images generated together; each chunk has its own random stream
_MAX_ROUNDS = 60  # redraw rounds per chunk before the options are declared too crowded
_MAX_TRIES = 8192  # tries drawn at once (bounds the memory of one round)
_FAR = -1.0e4  # coordinates of an unused paddle slot: far from everything
_CACHE_VERSION = 1
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


# --- options ----------------------------------------------------------------------------


def _check_size(arg: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " (0: no test split)" if minimum == 0 else ""
        raise ValueError(f"{arg}={value!r} is not allowed; expected an integer >= {minimum}{extra}")
    return value


class PathfinderConfig:
    """The generation options of a Pathfinder task (validated; ``ValueError`` names the key).

    ``image_size`` >= 32 keeps the Pathfinder-32 paddle geometry (LRA's larger images use
    other paddle settings). ``contour_length`` is the paddles per target snake (LRA: 14
    for the hard set, 9 intermediate, 6 easy), ``distractor_length`` the paddles per
    distractor snake and ``num_distractors`` how many (LRA: ``contour_length // 3`` and
    ``20 // distractor_length``: 4 and 5 at length 14).
    """

    def __init__(
        self,
        image_size: int = 32,
        contour_length: int = 14,
        distractor_length: int = 4,
        num_distractors: int = 5,
        seed: int = 0,
    ) -> None:
        self.image_size = check_positive_int("image_size", image_size, minimum=MIN_IMAGE_SIZE)
        if image_size > 256:
            raise ValueError(
                f"image_size={image_size!r} is not allowed; expected 32 <= image_size <= 256"
            )
        self.contour_length = check_positive_int("contour_length", contour_length, minimum=2)
        longest = 2 * image_size
        if contour_length > longest:
            raise ValueError(
                f"contour_length={contour_length!r} is not allowed with image_size={image_size}; "
                f"expected 2 <= contour_length <= {longest}"
            )
        self.distractor_length = check_positive_int("distractor_length", distractor_length)
        if distractor_length > contour_length:
            raise ValueError(
                f"distractor_length={distractor_length!r} is larger than contour_length="
                f"{contour_length!r}; expected distractor_length <= contour_length"
            )
        self.num_distractors = _check_size("num_distractors", num_distractors, 0)
        if num_distractors > 64:
            raise ValueError(f"num_distractors={num_distractors!r} is not allowed; expected 0..64")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is not allowed; expected an integer >= 0")
        self.seed = seed

    @property
    def num_paddles(self) -> int:
        """Paddle slots per image: both target snakes and every distractor."""
        return 2 * self.contour_length + self.num_distractors * self.distractor_length

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


# --- geometry ---------------------------------------------------------------------------


def _unit(angle: np.ndarray) -> np.ndarray:
    """(...,) angles -> (..., 2) unit vectors as (dy, dx)."""
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``p`` to segments ``a``-``b`` (all (..., 2), broadcast)."""
    # component-wise: numpy's reductions over a length-2 axis are slow
    aby, abx = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    apy, apx = p[..., 0] - a[..., 0], p[..., 1] - a[..., 1]
    length2 = np.maximum(aby * aby + abx * abx, 1e-12)
    t = np.clip((apy * aby + apx * abx) / length2, 0.0, 1.0)
    dy, dx = apy - t * aby, apx - t * abx
    return np.sqrt(dy * dy + dx * dx)


def segment_distance(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Distance between segments ``s`` and ``t`` given as (..., 4) = (y0, x0, y1, x1).

    Zero where they cross; otherwise the smallest endpoint-to-segment distance (the
    closest points of two non-crossing segments include an endpoint of one of them).
    """
    a, b, c, d = s[..., :2], s[..., 2:], t[..., :2], t[..., 2:]
    dist = np.minimum(
        np.minimum(point_segment_distance(a, c, d), point_segment_distance(b, c, d)),
        np.minimum(point_segment_distance(c, a, b), point_segment_distance(d, a, b)),
    )
    crossing = (_cross(b - a, c - a) * _cross(b - a, d - a) < 0) & (
        _cross(d - c, a - c) * _cross(d - c, b - c) < 0
    )
    return np.where(crossing, 0.0, dist)


class _Frame:
    """The allowed box for paddle endpoints: ``margin`` inside the ``padding`` border."""

    def __init__(self, size: int) -> None:
        self.lo, self.hi = PADDING + PADDLE_MARGIN, size - PADDING - PADDLE_MARGIN

    def holds(self, segments: np.ndarray) -> np.ndarray:
        return ((segments >= self.lo) & (segments <= self.hi)).all(-1)


def _clear_of(candidates: np.ndarray, paddles: np.ndarray, skip: np.ndarray | None) -> np.ndarray:
    """(B, K, 4) candidates vs (B, F, 4) paddles: True where every paddle but slot
    ``skip[b]`` (the predecessor) is at least ``PADDLE_CLEARANCE`` away.

    All paddles have length ``PADDLE_LENGTH``, so a paddle whose midpoint is more than
    ``PADDLE_LENGTH + PADDLE_CLEARANCE`` from a candidate's midpoint is clear of it; only
    the close pairs get exact segment distances. Candidates around one pivot (a growth
    step) are screened together, scattered ones (seeds) one by one.
    """
    n, k = candidates.shape[:2]
    clear = np.ones((n, k), dtype=bool)
    if paddles.shape[1] == 0:
        return clear
    mid_c = (candidates[..., :2] + candidates[..., 2:]) / 2
    mid_p = (paddles[..., :2] + paddles[..., 2:]) / 2
    reach = PADDLE_LENGTH + PADDLE_CLEARANCE
    centre = mid_c.mean(1)
    spread = np.sqrt(((mid_c - centre[:, None]) ** 2).sum(-1)).max(1)
    if spread.max() > reach:
        # per candidate: (B, K, F) screen
        dy = mid_c[:, :, None, 0] - mid_p[:, None, :, 0]
        dx = mid_c[:, :, None, 1] - mid_p[:, None, :, 1]
        near = dy * dy + dx * dx < reach**2
        if skip is not None:
            near[np.arange(n), :, skip] = False
        rows, cand, slots = np.nonzero(near)
        clash = segment_distance(candidates[rows, cand], paddles[rows, slots]) < PADDLE_CLEARANCE
        clear[rows[clash], cand[clash]] = False
        return clear
    # per image: (B, F) screen around the candidates' centre, then (pairs, K) exact
    dy, dx = mid_p[..., 0] - centre[:, None, 0], mid_p[..., 1] - centre[:, None, 1]
    near = dy * dy + dx * dx < ((spread + reach) ** 2)[:, None]
    if skip is not None:
        near[np.arange(n), skip] = False
    rows, slots = np.nonzero(near)  # sorted by row
    if not len(rows):
        return clear
    clash = segment_distance(candidates[rows], paddles[rows, slots][:, None]) < PADDLE_CLEARANCE
    hit, start = np.unique(rows, return_index=True)
    clear[hit] = ~np.logical_or.reduceat(clash, start, axis=0)
    return clear


def _clear_of_markers(candidates: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(B, K, 4) candidates vs (B, M, 2) marker centres: every centre far enough away."""
    if points.shape[1] == 0:
        return np.ones(candidates.shape[:2], dtype=bool)
    dist = point_segment_distance(
        points[:, None, :, :], candidates[:, :, None, :2], candidates[:, :, None, 2:]
    )
    return dist.min(-1) >= MARKER_CLEARANCE


def _snap(point: np.ndarray) -> np.ndarray:
    """The centre of the pixel holding ``point``: where a marker on it is drawn (a disc
    centred on a pixel is a symmetric blob, as in the published images)."""
    return np.floor(point) + 0.5


def _paddle(tail: np.ndarray, angle: np.ndarray) -> np.ndarray:
    return np.concatenate([tail, tail + PADDLE_LENGTH * _unit(angle)], axis=-1)


def _first_valid(valid: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first valid candidate per row of (B, K, ...) and whether there was one."""
    k = valid.argmax(1)
    return candidates[np.arange(len(k)), k], valid.any(1)


def _extend(
    rng: np.random.Generator,
    paddles: np.ndarray,
    skip: np.ndarray,
    frame: _Frame,
    points: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Grow each image's snake whose last paddle is ``paddles[b, skip[b]]`` by one paddle.

    The new paddle starts ``margin`` past a pivot one ``margin`` beyond the last head, so
    consecutive paddles are ``2 * margin`` apart at most (a dashed contour). Turn angles
    are stratified over (-90, 90) degrees and one is drawn per image with weight
    ``cos(min(continuity * |turn|, pi / 2)) ** 2`` among those whose paddle passes the
    checks against ``paddles`` (all slots but ``skip``) and the marker centres ``points``
    (B, M, 2). Returns the (B, 4) new paddles and whether each image had a legal one.
    """
    n = len(paddles)
    last = paddles[np.arange(n), skip]
    tail, head = last[:, :2], last[:, 2:]
    angle = np.arctan2(head[:, 0] - tail[:, 0], head[:, 1] - tail[:, 1])
    pivot = head + PADDLE_MARGIN * _unit(angle)
    turn = -math.pi / 2 + (np.arange(_TURNS) + rng.random((n, _TURNS))) * (math.pi / _TURNS)
    direction = _unit(angle[:, None] + turn)
    candidates = np.concatenate(
        [
            pivot[:, None] + PADDLE_MARGIN * direction,
            pivot[:, None] + (PADDLE_LENGTH + PADDLE_MARGIN) * direction,
        ],
        axis=-1,
    )
    valid = frame.holds(candidates) & _clear_of_markers(candidates, points)
    valid &= _clear_of(candidates, paddles, skip)
    weight = np.cos(np.minimum(CONTINUITY * np.abs(turn), math.pi / 2)) ** 2 * valid
    total = weight.sum(1)
    pick = (np.cumsum(weight, 1) < (rng.random(n) * total)[:, None]).sum(1)
    pick = np.minimum(pick, _TURNS - 1)
    return candidates[np.arange(n), pick], total > 0


def _seed_targets(
    rng: np.random.Generator, n: int, size: int, frame: _Frame
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First paddles of both target snakes: (n, 4), (n, 4) and whether a placement was found.

    The first tail is uniform in ``[2 d, size - 2 d]`` squared (``d`` the seed distance,
    as published), the second ``d`` away in a uniform direction; orientations uniform.
    """
    shape = (n, _SEED_TRIES)
    low, high = 2 * SEED_DISTANCE, size - 2 * SEED_DISTANCE
    tail1 = rng.uniform(low, high, (*shape, 2))
    tail2 = tail1 + SEED_DISTANCE * _unit(rng.uniform(-math.pi, math.pi, shape))
    first = _paddle(tail1, rng.uniform(-math.pi, math.pi, shape))
    second = _paddle(tail2, rng.uniform(-math.pi, math.pi, shape))
    valid = frame.holds(first) & frame.holds(second)
    valid &= segment_distance(first, second) >= PADDLE_CLEARANCE
    # each snake's first tail may carry a marker: the other snake keeps its distance
    marker1, marker2 = _snap(tail1), _snap(tail2)
    valid &= point_segment_distance(marker1, second[..., :2], second[..., 2:]) >= MARKER_CLEARANCE
    valid &= point_segment_distance(marker2, first[..., :2], first[..., 2:]) >= MARKER_CLEARANCE
    k = valid.argmax(1)
    rows = np.arange(n)
    return first[rows, k], second[rows, k], valid.any(1)


def _seed_anywhere(
    rng: np.random.Generator, paddles: np.ndarray, frame: _Frame, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A paddle at a uniform random legal place (rejection over ``_SEED_TRIES`` draws)."""
    n = len(paddles)
    shape = (n, _SEED_TRIES)
    candidates = _paddle(
        rng.uniform(frame.lo, frame.hi, (*shape, 2)), rng.uniform(-math.pi, math.pi, shape)
    )
    valid = frame.holds(candidates)
    valid &= _clear_of(candidates, paddles, skip=None)
    valid &= _clear_of_markers(candidates, points)
    return _first_valid(valid, candidates)


@dataclass
class Geometry:
    """What was drawn, per image (the generator's ground truth, for checks and plots).

    ``paddles`` (n, P, 2, 2): tail and head (y, x) of each paddle slot, NaN where unused;
    ``snake`` (n, P): 0 and 1 for the target snakes, 2, 3, ... for distractors, -1 unused;
    ``markers`` (n, 2, 2): centres of the origin and the terminal marker (pixel centres,
    within half a pixel of the snake's end in each coordinate);
    ``marker_snake`` (n, 2): the target snake each marker is on. Pixel (i, j) covers
    ``[i, i + 1) x [j, j + 1)`` in these coordinates.
    """

    paddles: np.ndarray
    snake: np.ndarray
    markers: np.ndarray
    marker_snake: np.ndarray

    def select(self, index: np.ndarray) -> Geometry:
        """The images ``index`` (an index array or a bool mask over images)."""
        return Geometry(
            self.paddles[index], self.snake[index], self.markers[index], self.marker_snake[index]
        )


def _grow_targets(
    rng: np.random.Generator, n: int, cfg: PathfinderConfig, frame: _Frame
) -> tuple[np.ndarray, np.ndarray]:
    """Both target snakes of ``n`` images: (n, 2 * contour_length, 4) paddles (snake s's
    paddle i in slot 2 i + s) and whether each image got them.

    The snakes grow alternately, one paddle each per step. An image in which a snake meets
    a dead end is given up (the caller draws it again from scratch, as the published code
    does); the steps run only for the images still growing.
    """
    slots = 2 * cfg.contour_length
    paddles = np.full((n, slots, 4), _FAR)
    first, second, alive = _seed_targets(rng, n, cfg.image_size, frame)
    paddles[:, 0], paddles[:, 1] = first, second
    origins = _snap(np.stack([first[:, :2], second[:, :2]], axis=1))
    for slot in range(2, slots):
        s = slot % 2
        rows = np.flatnonzero(alive)
        if not len(rows):
            break
        skip = np.full(len(rows), slot - 2)
        points = origins[rows, 1 - s : 2 - s]  # the other snake's marker, if it gets one
        paddles[rows, slot], ok = _extend(rng, paddles[rows, :slot], skip, frame, points)
        alive[rows[~ok]] = False
    return paddles, alive


def _attempt(
    rng: np.random.Generator, labels: np.ndarray, cfg: PathfinderConfig
) -> tuple[np.ndarray, Geometry]:
    """Try to draw one image per label; returns which succeeded and the geometry of all."""
    n, frame = len(labels), _Frame(cfg.image_size)
    length = cfg.contour_length
    paddles = np.full((n, cfg.num_paddles, 4), _FAR)
    snake = np.full((n, cfg.num_paddles), -1, dtype=np.int8)
    paddles[:, : 2 * length], alive = _grow_targets(rng, n, cfg, frame)
    snake[:, 0 : 2 * length : 2], snake[:, 1 : 2 * length : 2] = 0, 1
    origin = rng.integers(0, 2, n)
    terminal = np.where(labels == 1, origin, 1 - origin)
    rows = np.arange(n)
    last = 2 * (length - 1)
    ends = np.stack([paddles[rows, origin, :2], paddles[rows, last + terminal, 2:]], axis=1)
    markers = _snap(ends)
    alive &= np.linalg.norm(markers[:, 0] - markers[:, 1], axis=-1) >= MARKER_SEPARATION
    # the terminal marker is clear of the snake it does not end
    target = paddles[:, : 2 * length]
    to_other = point_segment_distance(markers[:, 1:2], target[..., :2], target[..., 2:])
    foreign = snake[:, : 2 * length] == (1 - terminal)[:, None]
    alive &= np.where(foreign, to_other, np.inf).min(1) >= MARKER_CLEARANCE
    _add_distractors(rng, paddles, snake, markers, alive, cfg, frame)
    geometry = Geometry(
        paddles=np.where(snake[..., None] >= 0, paddles, np.nan).reshape(n, -1, 2, 2),
        snake=snake,
        markers=markers,
        marker_snake=np.stack([origin, terminal], axis=1).astype(np.int8),
    )
    return alive, geometry


def _add_distractors(
    rng: np.random.Generator,
    paddles: np.ndarray,
    snake: np.ndarray,
    markers: np.ndarray,
    alive: np.ndarray,
    cfg: PathfinderConfig,
    frame: _Frame,
) -> None:
    """Grow the distractor snakes in place (images not ``alive`` are skipped)."""
    length = cfg.distractor_length
    for j in range(cfg.num_distractors):
        start = 2 * cfg.contour_length + j * length
        need = alive.copy()
        for _ in range(_DISTRACTOR_TRIES):
            rows = np.flatnonzero(need)
            if not len(rows):
                break
            trial = paddles[rows, : start + length].copy()
            points = markers[rows]
            trial[:, start], ok = _seed_anywhere(rng, trial[:, :start], frame, points)
            for i in range(1, length):
                slot = start + i
                skip = np.full(len(rows), slot - 1)
                trial[:, slot], grown = _extend(rng, trial[:, :slot], skip, frame, points)
                ok &= grown
            done = rows[ok]
            paddles[done, start : start + length] = trial[ok, start:]
            snake[done, start : start + length] = 2 + j
            need[done] = False


# --- rendering --------------------------------------------------------------------------


def _coverage(distance: np.ndarray, half_width: float) -> np.ndarray:
    """Share of a fine pixel (side 1 / antialias) covered by a shape whose edge is at
    ``half_width`` from its centre line: a linear ramp one fine pixel wide."""
    fine = 1.0 / ANTIALIAS
    return np.clip((half_width + fine / 2 - distance) / fine, 0.0, 1.0)


def _fine_offsets() -> np.ndarray:
    """(A*A, 2) sample positions inside a pixel, at the centres of its fine pixels."""
    centres = (np.arange(ANTIALIAS) + 0.5) / ANTIALIAS
    return np.stack(np.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)


def _stamp(
    canvas: np.ndarray,
    origin: np.ndarray,
    width: int,
    coverage: Callable[[np.ndarray], np.ndarray],
    contrast: np.ndarray,
) -> None:
    """Max-blend a (width x width)-pixel window per image into ``canvas`` (n, H, W).

    ``origin`` (n, 2) is each window's top-left pixel; ``coverage(points)`` gives the
    covered share (0-1) at (n, width, width, A*A, 2) sub-pixel points; each pixel gets the
    mean over its sub-pixels times ``contrast`` (n,).
    """
    n = len(canvas)
    cells = np.stack(np.meshgrid(np.arange(width), np.arange(width), indexing="ij"), -1)
    pixels = origin[:, None, None, :] + cells[None]  # (n, w, w, 2)
    samples = pixels[:, :, :, None, :] + _fine_offsets()  # (n, w, w, A*A, 2)
    value = coverage(samples).mean(-1) * contrast[:, None, None]
    rows = np.arange(n)[:, None, None]
    ys, xs = pixels[..., 0], pixels[..., 1]
    # one window per image: no index repeats within this assignment
    canvas[rows, ys, xs] = np.maximum(canvas[rows, ys, xs], value)


def render(geometry: Geometry, image_size: int, markers: bool = True) -> np.ndarray:
    """(n, image_size, image_size) uint8 images of ``geometry``.

    Each paddle (thickness ``PADDLE_THICKNESS``) and marker disc (``MARKER_RADIUS``) is
    sampled at the centres of ``ANTIALIAS`` x ``ANTIALIAS`` sub-pixels with a one-sub-pixel
    linear edge ramp, box-averaged, scaled by its contrast, max-blended and clipped to 1.
    Only a small window around each shape is evaluated, one paddle slot at a time for the
    whole batch. ``markers=False`` leaves the markers out (e.g. to draw snakes apart).
    """
    n = len(geometry.snake)
    points = geometry.paddles[geometry.snake >= 0].reshape(-1, 2)
    if markers:
        points = np.concatenate([points, geometry.markers.reshape(-1, 2)])
    if points.size and not (0 <= points.min() and points.max() <= image_size):
        raise ValueError(
            f"geometry has points from {points.min():.3g} to {points.max():.3g}; expected "
            f"paddles and markers inside the image, [0, image_size={image_size}]"
        )
    pad = 4  # windows never leave the padded canvas
    canvas = np.zeros((n, image_size + 2 * pad, image_size + 2 * pad))
    for slot in range(geometry.snake.shape[1]):
        used = geometry.snake[:, slot] >= 0
        if not used.any():
            continue
        seg = geometry.paddles[used, slot] + pad  # (m, 2, 2)
        # ink reaches 0.5 px past a paddle (half thickness + ramp) and a paddle spans at
        # most 2 px per axis: 5 pixels from floor(min - 0.5) hold all of it
        low = np.floor(seg.min(1) - 0.5).astype(np.int64)
        contrast = np.where(geometry.snake[used, slot] < 2, TARGET_CONTRAST, DISTRACTOR_CONTRAST)
        a, b = seg[:, None, None, None, 0], seg[:, None, None, None, 1]
        sub = canvas[used]
        _stamp(
            sub,
            low,
            5,
            lambda p, a=a, b=b: _coverage(point_segment_distance(p, a, b), PADDLE_THICKNESS / 2),
            contrast,
        )
        canvas[used] = sub
    for k in range(2 if markers else 0):
        centre = geometry.markers[:, k] + pad
        # ink reaches 1.75 px from the centre: 6 pixels from floor(centre - 2) hold it
        low = np.floor(centre - MARKER_RADIUS - 0.5).astype(np.int64)
        c = centre[:, None, None, None, :]
        _stamp(
            canvas,
            low,
            6,
            lambda p, c=c: _coverage(np.sqrt(((p - c) ** 2).sum(-1)), MARKER_RADIUS),
            np.full(n, MARKER_CONTRAST),
        )
    image = canvas[:, pad:-pad, pad:-pad]
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


# --- generation -------------------------------------------------------------------------


@dataclass
class Samples:
    """Generated images (n, S, S) uint8, labels (n,) int64 (1: the markers are connected)
    and, when asked for, the ``Geometry`` they were drawn from."""

    images: np.ndarray
    labels: np.ndarray
    geometry: Geometry | None = None

    def select(self, index: np.ndarray) -> Samples:
        """The images ``index`` (an index array or a bool mask over images)."""
        geometry = None if self.geometry is None else self.geometry.select(index)
        return Samples(self.images[index], self.labels[index], geometry)


def _balanced_labels(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` labels, half of them 1 (the odd one out at random), shuffled."""
    ones = count // 2 + (int(rng.integers(0, 2)) if count % 2 else 0)
    labels = np.zeros(count, dtype=np.int64)
    labels[:ones] = 1
    return rng.permutation(labels)


def _generate_chunk(
    cfg: PathfinderConfig, count: int, stream: np.random.SeedSequence, keep_geometry: bool
) -> Samples:
    rng = np.random.default_rng(stream)
    labels = _balanced_labels(rng, count)
    size, slots = cfg.image_size, cfg.num_paddles
    images = np.zeros((count, size, size), dtype=np.uint8)
    geometry = Geometry(
        np.full((count, slots, 2, 2), np.nan),
        np.full((count, slots), -1, np.int8),
        np.zeros((count, 2, 2)),
        np.zeros((count, 2), np.int8),
    )
    todo, rate, tried, drawn_ok = np.arange(count), 0.05, 0, 0
    for _ in range(_MAX_ROUNDS):
        if not len(todo):
            break
        # most tries fail (a snake meets a dead end): enough tries for the missing images
        # at the success rate seen so far, each label in its share; each success fills the
        # next missing image of its label
        tries = int(np.clip(math.ceil(1.2 * len(todo) / rate), 64, _MAX_TRIES))
        want = labels[todo]
        ok, drawn = _attempt(rng, want[np.arange(tries) % len(todo)], cfg)
        tried, drawn_ok = tried + tries, drawn_ok + int(ok.sum())
        if drawn_ok == 0 and tried >= 512:
            break
        rate = max(drawn_ok / tried, 1e-3)
        filled = np.zeros(len(todo), dtype=bool)
        for label in (0, 1):
            hits = np.flatnonzero(ok & (want[np.arange(tries) % len(todo)] == label))
            open_slots = np.flatnonzero(want == label)
            used = min(len(hits), len(open_slots))
            won, slots_won = drawn.select(hits[:used]), todo[open_slots[:used]]
            images[slots_won] = render(won, size)
            for field in Geometry.__dataclass_fields__:
                getattr(geometry, field)[slots_won] = getattr(won, field)
            filled[open_slots[:used]] = True
        todo = todo[~filled]
    if len(todo):
        raise ValueError(
            f"could not draw {len(todo)} of {count} Pathfinder images ({drawn_ok} of {tried} "
            f"tries succeeded) with {cfg.as_dict()}: the snakes do not fit; lower "
            f"contour_length, distractor_length or num_distractors, or raise image_size"
        )
    return Samples(images, labels, geometry if keep_geometry else None)


def generate(
    cfg: PathfinderConfig, count: int, split: str = "train", geometry: bool = False
) -> Samples:
    """``count`` images of ``split`` (labels balanced: exactly half are 1 for even ``count``).

    Deterministic given ``cfg`` (its ``seed``), ``split`` and ``count`` (the same bytes on
    every call): images come in chunks of 1024, each from its own random stream
    (``SeedSequence(seed, spawn_key=(split, chunk))``), and the splits use disjoint
    streams. ``geometry=True`` also returns what was drawn (``Samples.geometry``).
    Vectorised with NumPy: every growth step runs for all the images of a chunk at once.
    """
    check_choice("split", split, SPLITS)
    check_positive_int("count", count)
    parts = []
    for chunk, start in enumerate(range(0, count, _CHUNK)):
        stream = np.random.SeedSequence(cfg.seed, spawn_key=(_SPLIT_STREAMS[split], chunk))
        parts.append(_generate_chunk(cfg, min(_CHUNK, count - start), stream, geometry))
    return Samples(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        _concat_geometry([p.geometry for p in parts]) if geometry else None,
    )


def _concat_geometry(parts: list[Geometry]) -> Geometry:
    return Geometry(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in Geometry.__dataclass_fields__)
    )


# --- disk cache -------------------------------------------------------------------------


def _checksum(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


class CorruptCacheError(ValueError):
    """A cached split does not match its checksum, shape or options."""


def save_split(path: Path, images: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Write ``path`` (.npz: uint8 images, int64 labels) and its JSON sidecar
    (``meta`` plus the sha256 of the arrays' bytes), each atomically; the sidecar last,
    so a sidecar always describes a complete array file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, images=images, labels=labels)
    tmp.replace(path)
    record = {**meta, "count": len(labels), "sha256": _checksum(images, labels)}
    sidecar = path.with_suffix(".json")
    tmp_json = sidecar.with_name(f"{sidecar.stem}.tmp{os.getpid()}.json")
    tmp_json.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp_json.replace(sidecar)


def load_split(path: Path, meta: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The arrays cached at ``path``, or None if there is no complete cache there.

    Raises ``CorruptCacheError`` when the file cannot be read or its contents do not match
    the sidecar's sha256, count or options (``meta``).
    """
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text())
        with np.load(path, allow_pickle=False) as stored:
            images, labels = stored["images"], stored["labels"]
    except Exception as error:  # a truncated zip, a bad JSON, a missing array
        raise CorruptCacheError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    expected = {k: record.get(k) for k in meta}
    if expected != meta:
        raise CorruptCacheError(f"{path}: written for {expected}, expected {meta}")
    size = meta["options"]["image_size"]
    if images.dtype != np.uint8 or images.shape != (record.get("count"), size, size):
        raise CorruptCacheError(f"{path}: images {images.dtype} {images.shape} do not match")
    if _checksum(images, labels) != record.get("sha256"):
        raise CorruptCacheError(f"{path}: sha256 of the arrays does not match {sidecar.name}")
    return images, labels


# --- task -------------------------------------------------------------------------------

_POOLS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per-process cache


@register(
    "pathfinder",
    description="LRA Pathfinder-32: are the two markers on one dashed curve? "
    "(encoder, 2 classes, 1024 pixel tokens)",
)
class Pathfinder(PooledSplits, Task):
    """LRA Pathfinder as an encoder task: 2 classes, ``image_size ** 2`` pixel tokens.

    Tokens are pixel intensities (vocabulary ``"0"``..``"255"``) in row-major order; all
    sequences have the same length, so batches carry no mask. Each split is a fixed pool
    generated on first use (about 20 s per 10,000 images on one core) and kept per
    process and, with ``cache_dir``, on disk (``pathfinder-<key>-<split>.npz`` and a
    ``.json`` with the options and a sha256 of the arrays; a cache that fails its check is
    reported with a warning and regenerated). Defaults are LRA's Pathfinder-32 "hard"
    setting and split (200k images: 160k / 20k / 20k); ``test_size=0`` drops the test
    split. Labels are balanced per split, so chance is 50%.
    """

    name = "pathfinder"
    kind = "encoder"
    num_classes = 2
    main_metric = "accuracy"
    higher_is_better = True
    vocab = VOCAB

    def __init__(
        self,
        image_size: int = 32,
        contour_length: int = 14,
        distractor_length: int = 4,
        num_distractors: int = 5,
        train_size: int = 160_000,
        val_size: int = 20_000,
        test_size: int = 20_000,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.config = PathfinderConfig(
            image_size, contour_length, distractor_length, num_distractors, seed
        )
        self.sizes = {
            "train": _check_size("train_size", train_size, 1),
            "val": _check_size("val_size", val_size, 1),
            "test": _check_size("test_size", test_size, 0),
        }
        self.splits = SPLITS if test_size else SPLITS[:2]
        self.max_len = image_size * image_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()

    # pools

    def _meta(self, split: str) -> dict:
        return {
            "format": "formerlab-pathfinder",
            "version": _CACHE_VERSION,
            "options": self.config.as_dict(),
            "split": split,
        }

    def _key(self, split: str) -> str:
        meta = {**self._meta(split), "count": self.sizes[split]}
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]

    def cache_file(self, split: str) -> Path | None:
        """Where ``split`` is cached on disk (None without ``cache_dir``)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"pathfinder-{self._key(split)}-{split}.npz"

    def images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool of ``split``: uint8 images (n, S, S) and int64 labels (n,)."""
        check_choice("split", split, self.splits)
        key = self._key(split)
        if key not in _POOLS:
            images, labels = self._load_or_generate(split)
            _POOLS[key] = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        return _POOLS[key]

    def _load_or_generate(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        path, meta = self.cache_file(split), self._meta(split)
        if path is not None:
            try:
                cached = load_split(path, meta)
            except CorruptCacheError as error:
                warnings.warn(
                    f"Pathfinder cache is corrupt, regenerating it: {error}", stacklevel=3
                )
                cached = None
            if cached is not None:
                return cached
        samples = generate(self.config, self.sizes[split], split)
        if path is not None:
            save_split(path, samples.images, samples.labels, meta)
        return samples.images, samples.labels

    # Task interface

    def _batch_of(self, split: str, index: torch.Tensor) -> Batch:
        images, labels = self.images(split)
        return Batch(images[index].reshape(len(index), -1).long(), labels[index])

    def pool_size(self, split: str) -> int:
        return self.sizes[split]

    def decode(self, ids: list[int]) -> str:
        return " ".join(VOCAB[i] for i in ids)
