"""Attention maps of a trained run: exact softmax vs Nyström variants vs any kernel.

``attention_maps(run_dir, text, layer, head)`` feeds ``text`` through the trained model,
takes the query/key/value projections of one head at the input of one layer's attention
mixer, and runs several kernels on those same q, k, v with ``need_weights=True``:
exact softmax, Nyström with 6 fixed pseudoinverse iterations (the paper's setting),
Nyström iterated to a tolerance, Nyström with the exact pseudoinverse, plus any kernel
asked for. Each map's relative Frobenius error against softmax goes in its title.

A causal model (a decoder) is shown as it ran: the reference is causal softmax, the Nyström
panels are ``causal_nystrom`` (block and triangular landmark systems), every panel's map is
lower-triangular, and a kernel that cannot run causally is refused (naming the causal ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from formerlab import attention
from formerlab.experiments import plots
from formerlab.mixers.self_attention import split_heads
from formerlab.train.checkpoint import load_run

#: (title, options) of the Nyström variants always drawn when ``nystrom`` is registered
NYSTROM_VARIANTS = (
    ("Nyström, 6 iterations", {"pinv_iters": 6}),
    ("Nyström, to tolerance 1e-6", {"pinv_iters": None, "pinv_tol": 1e-6, "pinv_max_iter": 200}),
    ("Nyström, exact pinv", {"pinv_reg": "exact"}),
)

#: (title, options) drawn instead for a causal model (``causal_nystrom``, segment landmarks
#: of ``segment_size = ceil(N / num_landmarks)``): bidirectional Nyström would be scored
#: against a bidirectional reference the model never computed
CAUSAL_NYSTROM_VARIANTS = (
    ("causal Nyström, block landmarks", {"landmark_system": "block"}),
    ("causal Nyström, triangular landmarks", {"landmark_system": "triangular"}),
)


@dataclass
class AttentionMap:
    """One panel: a (N, N) map of one head and its relative error against exact softmax."""

    title: str
    weights: Tensor
    error: float | None
    note: str = ""


def parse_kernel_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"performer"`` or ``"nystrom:num_landmarks=8,pinv_iters=3"`` -> (name, options)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"kernel spec {spec!r}: {item!r} must look like key=value")
        options[key.strip()] = yaml.safe_load(value)
    attention.KERNELS.check_options(name.strip(), options)
    return name.strip(), options


def encode_text(task, text: str) -> list[int]:
    """The task's own encoder, or whitespace-separated vocabulary tokens for tasks without
    one (``"3 1 2 | _ _ _"`` for sort), or characters when ``text`` has no spaces."""
    try:
        ids = task.encode(text)
    except NotImplementedError:
        tokens = text.split() if any(c.isspace() for c in text.strip()) else list(text)
        ids = []
        for token in tokens:
            if token not in task.vocab:
                raise ValueError(
                    f"--text token {token!r} is not in task {task.name!r}'s vocabulary {task.vocab}"
                ) from None
            ids.append(task.vocab.index(token))
    if not ids:
        raise ValueError(f"--text {text!r} encodes to no tokens for task {task.name!r}")
    return ids


def _mixer_input(model, ids: Tensor, layer: int):
    """The (1, N, C) input of ``layer``'s mixer, the mixer and whether it ran causally."""
    blocks = getattr(getattr(model, "body", None), "blocks", None)
    if blocks is None:
        raise ValueError(
            f"this run's model ({type(model).__name__} with body "
            f"{type(getattr(model, 'body', None)).__name__}) has no stack of blocks to read "
            "attention from (DEQ models are not supported)"
        )
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer={layer} is not allowed; the model has layers 0..{len(blocks) - 1}")
    mixer = blocks[layer].mixer
    if not all(hasattr(mixer, a) for a in ("qkv", "heads", "head_dim")):
        raise ValueError(
            f"layer {layer}'s token mixer is {type(mixer).__name__}; attention maps need the "
            "'attention' mixer (model.mixer=attention), whose q/k/v any kernel can take"
        )
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["x"]
        captured["causal"] = bool(kwargs.get("causal", args[2] if len(args) > 2 else False))

    handle = mixer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids)
    finally:
        handle.remove()
    return captured["x"], mixer, captured["causal"]


def _weights(kernel, q, k, v, causal: bool) -> Tensor:
    """The kernel's (B, H, N, N) weights, computed as the model ran (causally or not)."""
    _, weights = kernel(q, k, v, causal=causal, need_weights=True)
    return weights.float().cpu()


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F``."""
    return float(torch.linalg.norm(approx - exact) / torch.linalg.norm(exact).clamp_min(1e-30))


@torch.no_grad()
def attention_maps(
    run_dir: str | Path,
    text: str,
    layer: int = 0,
    head: int = 0,
    kernels: list[str] | tuple[str, ...] = (),
    num_landmarks: int | None = None,
) -> tuple[list[str], list[AttentionMap], dict[str, Any]]:
    """``(tokens, panels, facts)`` for ``text`` through the run in ``run_dir``.

    ``num_landmarks`` for the Nyström panels (and any asked kernel that takes it): default
    the run's own when it trained with such a kernel, else N // 4 (at least 2), so the
    approximation is visible even on a short text (with m >= N Nyström is exact).
    """
    model, task, cfg = load_run(run_dir)
    ids = encode_text(task, text)
    limit = cfg.model.max_len or task.max_len
    if len(ids) > limit:
        raise ValueError(f"--text is {len(ids)} tokens; the model takes at most {limit}")
    if num_landmarks is None:
        num_landmarks = cfg.model.kernel_options.get("num_landmarks") or max(2, len(ids) // 4)
    x, mixer, causal = _mixer_input(model, torch.tensor([ids]), layer)
    if not 0 <= head < mixer.heads:
        raise ValueError(f"head={head} is not allowed; layer {layer} has heads 0..{mixer.heads - 1}")
    # float64 so that the references (exact pinv, tolerance 1e-6) are not float32-limited
    q, k, v = (split_heads(t, mixer.heads).double() for t in mixer.qkv(x).chunk(3, dim=-1))
    scale = cfg.model.kernel_options.get("scale")
    softmax = attention.build("softmax", **({"scale": scale} if scale else {}))
    exact = _weights(softmax, q, k, v, causal)[0, head]
    segment_size = max(1, math.ceil(len(ids) / num_landmarks))

    requested: list[tuple[str, str, dict[str, Any]]] = []
    if causal and "causal_nystrom" in attention.KERNELS:
        for title, options in CAUSAL_NYSTROM_VARIANTS:
            requested.append((f"{title} (s={segment_size})", "causal_nystrom",
                              {**options, "segment_size": segment_size}))
    elif not causal and "nystrom" in attention.KERNELS:
        for title, options in NYSTROM_VARIANTS:
            requested.append((title, "nystrom", {**options, "num_landmarks": num_landmarks}))
    for spec in kernels:
        name, options = parse_kernel_spec(spec)
        if causal and name not in attention.available(causal=True):
            raise ValueError(
                f"kernel {name!r} cannot run causally, and this run's model is causal (a "
                f"decoder): its map could only be compared with attention the model never "
                f"computed; causal kernels: {attention.available(causal=True)}"
            )
        takes = attention.KERNELS.entry(name).options()
        # causal_nystrom refuses num_landmarks with causal=True (not prefix consistent)
        if "num_landmarks" in takes and not (causal and "segment_size" in takes):
            options.setdefault("num_landmarks", num_landmarks)
        shown = ", ".join(f"{k}={v}" for k, v in options.items())
        requested.append((f"{name}" + (f" ({shown})" if shown else ""), name, options))

    # every panel is computed as the model ran (causally for a decoder) and scored against
    # the exact softmax map drawn first
    panels = [AttentionMap("exact softmax" + (" (causal)" if causal else ""), exact, 0.0)]
    for title, name, options in requested:
        kernel = attention.build(name, **options)
        map_ = _weights(kernel, q, k, v, causal)[0, head]
        panels.append(AttentionMap(title, map_, relative_error(map_, exact)))
    tokens = [task.vocab[i] for i in ids]
    facts = {"layer": layer, "head": head, "causal": causal, "num_landmarks": num_landmarks,
             "task": task.name, "n": len(ids)}
    if causal:
        facts["segment_size"] = segment_size
    return tokens, panels, facts


def draw_attention(
    tokens: list[str], panels: list[AttentionMap], facts: dict[str, Any], path: str | Path
) -> Path:
    """Side-by-side heatmaps on one colour scale (the exact map's), errors in the titles."""
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = plots.new_figure(3.6 * columns + 0.8, 3.6 * rows + 0.6)
    axes = figure.subplots(rows, columns, squeeze=False)
    top = float(panels[0].weights.max())
    image = None
    for ax, panel in zip(axes.flat, panels):
        image = ax.imshow(panel.weights.numpy(), cmap="viridis", vmin=0.0, vmax=top,
                          interpolation="nearest")
        error = "reference" if panel.error == 0.0 and panel is panels[0] else f"rel. error {panel.error:.2e}"
        ax.set_title(f"{panel.title}\n{error}", fontsize="small")
        if len(tokens) <= 48:
            ticks = list(range(len(tokens)))
            ax.set_xticks(ticks, [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=6)
            ax.set_yticks(ticks, [repr(t)[1:-1] for t in tokens], fontsize=6)
        ax.set(xlabel="key", ylabel="query")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    figure.suptitle(
        f"{facts['task']}: layer {facts['layer']}, head {facts['head']}, N={facts['n']}, "
        + ("causal, " if facts.get("causal") else "")
        + (f"causal Nyström segments s={facts['segment_size']}" if "segment_size" in facts
           else f"Nyström landmarks m={facts['num_landmarks']}")
        + " (colour scale: exact map's range)"
    )
    return plots.save(figure, path)


def attention_figure(
    run_dir: str | Path,
    text: str,
    layer: int = 0,
    head: int = 0,
    kernels: list[str] | tuple[str, ...] = (),
    num_landmarks: int | None = None,
    out: str | Path | None = None,
) -> tuple[Path, list[AttentionMap]]:
    """Compute the maps and write the PNG (default ``RUN_DIR/attention-layerL-headH.png``)."""
    tokens, panels, facts = attention_maps(run_dir, text, layer, head, kernels, num_landmarks)
    path = Path(out) if out is not None else Path(run_dir) / f"attention-layer{layer}-head{head}.png"
    return draw_attention(tokens, panels, facts, path), panels
