"""Approximation error of every registered attention kernel against exact softmax.

``formerlab approx`` measures, on the same q, k, v, for every approximate kernel of the
registry (non-causal ones against exact softmax; with ``causal=True`` the causal ones
against exact causal softmax) the relative errors

    ‖Â − A‖_F / ‖A‖_F   (the attention matrices, where the kernel can return Â)
    ‖ÂV − AV‖_F / ‖AV‖_F   (the outputs)

Kernels are discovered from the registry, so mechanisms added later are covered without
edits here; ``nystrom`` is run in several variants (6 fixed iterations as in the paper,
iterated to tolerance, exact pseudoinverse, Tikhonov, selection by sampled rows).

It also prints Nyström's error-vs-iterations curve (semi-convergence: the exact
pseudoinverse of an ill-conditioned landmark matrix W amplifies the landmark error) and
the same for the Tikhonov λ.

q, k, v come from ``data="random"`` (white noise of std ``scale``), ``data="smooth"``
(white noise low-pass filtered along the sequence by a Gaussian of width ``smooth_width``,
renormalised to std ``scale`` — nearby tokens similar, as in language), or a trained
model (``checkpoint=RUN_DIR``: the q, k, v that each attention layer computes on a batch
of the run's validation data).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from formerlab import attention
from formerlab.attention.landmark import landmark_factors
from formerlab.attention.softmax import softmax_attention
from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.linalg.pinv import pinv_iterates, pinv_reg

DATA = ("random", "smooth")
EXACT = "softmax"


@dataclass
class QKV:
    """One set of per-head tensors to compare kernels on."""

    label: str
    q: Tensor
    k: Tensor
    v: Tensor
    attention_mask: Tensor | None = None


@dataclass
class Row:
    """Errors of one kernel (variant) on one QKV; ``None`` where not measurable."""

    source: str
    kernel: str
    weights_error: float | None
    output_error: float | None
    note: str = ""


@dataclass
class Curve:
    """Nyström output error per pseudoinverse iteration k = 0 … K (and per λ)."""

    source: str
    errors: list[float]
    cond_median: float
    best_iteration: int
    tikhonov: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class ApproxReport:
    rows: list[Row]
    curves: list[Curve]
    settings: dict[str, Any]


# --------------------------------------------------------------------------- data


def smooth_noise(shape: tuple[int, ...], width: float, generator: torch.Generator) -> Tensor:
    """White noise (…, N, D) filtered along N by a Gaussian of std ``width`` tokens,
    renormalised to unit std (per last-two-dims block)."""
    x = torch.randn(shape, generator=generator)
    if width > 0:
        radius = max(1, int(3 * width))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / width) ** 2)
        g = (g / g.sum()).view(1, 1, -1)
        n, d = shape[-2], shape[-1]
        flat = x.reshape(-1, n, d).transpose(1, 2).reshape(-1, 1, n)
        flat = torch.nn.functional.conv1d(flat, g, padding=radius)
        x = flat.reshape(-1, d, n).transpose(1, 2).reshape(shape)
    return x / x.std(dim=(-2, -1), keepdim=True)


def synthetic_qkv(
    n: int, head_dim: int = 64, heads: int = 4, batch: int = 1, scale: float = 1.0,
    data: str = "smooth", smooth_width: float = 8.0, seed: int = 0,
) -> QKV:
    """q, k (std ``scale``) and v (std 1) of shape (batch, heads, n, head_dim)."""
    check_choice("data", data, DATA)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n, head_dim)
    width = smooth_width if data == "smooth" else 0.0
    q = smooth_noise(shape, width, gen) * scale
    k = smooth_noise(shape, width, gen) * scale
    v = smooth_noise(shape, width, gen)
    label = f"{data} (std {scale:g}" + (f", width {smooth_width:g})" if width else ")")
    return QKV(label, q, k, v)


def checkpoint_qkv(run_dir: str, batch_size: int = 4, seed: int = 0) -> list[QKV]:
    """The q, k, v of every attention layer of a trained run on one validation batch.

    Uses ``formerlab.train.checkpoint.load_run``; layers are found as the ``SelfAttention``
    mixers of the model (their ``qkv`` projection and ``heads``).
    """
    from formerlab.mixers.self_attention import SelfAttention, split_heads
    from formerlab.train.checkpoint import load_run

    model, task, _ = load_run(run_dir)
    batch = task.batch("val", batch_size, torch.Generator().manual_seed(seed))
    captured: dict[str, tuple[Tensor, Tensor | None]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, SelfAttention):
            def hook(mod, args, kwargs, name=name):
                x = args[0]
                captured[name] = (x.detach(), kwargs.get("attention_mask"))
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    if not hooks:
        raise ValueError(f"run {run_dir!r} has no SelfAttention layers to take q, k from")
    try:
        with torch.no_grad():
            model(batch.inputs, attention_mask=batch.attention_mask)
    finally:
        for h in hooks:
            h.remove()
    out = []
    modules = dict(model.named_modules())
    for name, (x, mask) in captured.items():
        mod = modules[name]
        with torch.no_grad():
            q, k, v = (split_heads(t, mod.heads) for t in mod.qkv(x).chunk(3, dim=-1))
        out.append(QKV(f"{Path(run_dir).name}:{name}", q.float(), k.float(), v.float(), mask))
    return out


# --------------------------------------------------------------------------- kernels


def kernel_variants(causal: bool, landmarks: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, registry name, options) of every approximate kernel to compare.

    All registered kernels (causal ones when ``causal``) except exact softmax, with
    ``num_landmarks`` set where the kernel takes it; ``nystrom`` in five variants.
    """
    out: list[tuple[str, str, dict[str, Any]]] = []
    for entry in attention.describe():
        if entry.name == EXACT or (causal and not entry.causal):
            continue
        opts: dict[str, Any] = {}
        # causal_nystrom refuses num_landmarks with causal=True (not prefix consistent):
        # it keeps its default fixed segment size there
        if "num_landmarks" in entry.options() and not (causal and "segment_size" in entry.options()):
            opts["num_landmarks"] = landmarks
        if entry.name == "nystrom":
            out += [
                ("nystrom (6 iters)", "nystrom", {**opts, "pinv_iters": 6}),
                ("nystrom (tol 1e-6)", "nystrom", {**opts, "pinv_iters": None, "pinv_tol": 1e-6}),
                ("nystrom (exact pinv)", "nystrom", {**opts, "pinv_reg": "exact"}),
                ("nystrom (tikhonov 1e-3)", "nystrom", {**opts, "pinv_reg": "tikhonov"}),
                ("nystrom (select rows)", "nystrom", {**opts, "pinv_select": "rows"}),
            ]
        else:
            out.append((entry.name, entry.name, opts))
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def compare_kernels(
    data: QKV, causal: bool, landmarks: int, weights: bool = True, seed: int = 0
) -> list[Row]:
    """Errors of every kernel variant on ``data`` against exact (causal) softmax."""
    q, k, v, mask = data.q, data.k, data.v, data.attention_mask
    ref_out, ref_w = softmax_attention(q, k, v, mask, causal, need_weights=weights)
    real = None if mask is None else mask[:, None, :, None].to(q.dtype)
    if real is not None:
        ref_out = ref_out * real
    rows = []
    for label, name, opts in kernel_variants(causal, landmarks):
        torch.manual_seed(seed)  # kernels with random features / sampled rows
        try:
            kern = attention.build(name, **opts)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w_err = None
                if weights:
                    try:
                        out, w = kern(q, k, v, attention_mask=mask, causal=causal, need_weights=True)
                        w_err = _rel(w if real is None else w * real, ref_w if real is None else ref_w * real)
                    except ValueError:
                        out = kern(q, k, v, attention_mask=mask, causal=causal)
                else:
                    out = kern(q, k, v, attention_mask=mask, causal=causal)
            note = _note(kern, opts)
            rows.append(Row(data.label, label, w_err, _rel(out, ref_out), note))
        except Exception as error:  # a broken kernel must not hide the others' numbers
            rows.append(Row(data.label, label, None, None, f"error: {error}"[:120]))
    return rows


def _note(kern: Any, opts: dict[str, Any]) -> str:
    """Short diagnostics of a kernel call: pinv iterations, convergence, selection."""
    diag = getattr(kern, "diagnostics", None)
    d = diag() if callable(diag) else {}
    selected = {k: v for k, v in d.items() if k.startswith("pinv_selected")}
    if selected:
        return ", ".join(f"{k.removeprefix('pinv_selected_')} {v:.2f}" for k, v in selected.items())
    parts = []
    if "pinv_iterations" in d:
        parts.append(f"iters {d['pinv_iterations']:.1f}")
        if opts.get("pinv_iters", 6) is None:
            parts.append(f"converged {d['pinv_converged']:.0%}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- curves


def iteration_curve(data: QKV, landmarks: int, max_iter: int = 20, init: str = "auto",
                    order: int = 3) -> Curve:
    """Nyström output error ‖ÂV − AV‖/‖AV‖ with the k-th pinv iterate, k = 0 … max_iter,
    and with Tikhonov λ ∈ {1e-6, …, 1}."""
    q, k, v, mask = data.q, data.k, data.v, data.attention_mask
    ref, _ = softmax_attention(q, k, v, mask)
    real = None if mask is None else mask[:, None, :, None].to(q.dtype)
    if real is not None:
        ref = ref * real
    with torch.no_grad():
        fac = landmark_factors(q, k, v, mask, landmarks)
        W = fac.W()
        RV = fac.R @ fac.v
        errors = []
        for i, Z in enumerate(pinv_iterates(W, order=order, init=init)):
            out = fac.F @ (Z @ RV)
            errors.append(_rel(out if real is None else out * real, ref))
            if i >= max_iter:
                break
        tik = []
        for e in range(6, -1, -1):
            lam = 10.0 ** -e
            out = fac.F @ (pinv_reg(W, lam=lam) @ RV)
            tik.append((lam, _rel(out if real is None else out * real, ref)))
        cond = torch.linalg.cond(W.double()).flatten().median().item()
    finite = [e if math.isfinite(e) else math.inf for e in errors]
    return Curve(data.label, errors, cond, int(min(range(len(finite)), key=finite.__getitem__)), tik)


# --------------------------------------------------------------------------- driver


def run_approx(
    n: int = 1024,
    landmarks: int = 64,
    head_dim: int = 64,
    heads: int = 4,
    batch: int = 1,
    scales: tuple[float, ...] = (1.0, 2.0),
    data: tuple[str, ...] = ("smooth", "random"),
    smooth_width: float = 8.0,
    checkpoint: str | None = None,
    causal: bool = False,
    weights: bool = True,
    curve_iters: int = 20,
    seed: int = 0,
    progress=None,
) -> ApproxReport:
    """Run the study on synthetic q, k, v (each ``data`` × ``scales``) or a checkpoint;
    ``progress(message)``, when given, is called before each source."""
    check_positive_int("n", n, minimum=2)
    check_positive_int("landmarks", landmarks)
    check_positive_int("head_dim", head_dim)
    check_positive_int("heads", heads)
    check_positive_int("batch", batch)
    check_positive_int("curve_iters", curve_iters)
    for s in scales:
        check_positive_float("scale", s)
    for d in data:
        check_choice("data", d, DATA)
    sources: list[QKV]
    if checkpoint is not None:
        sources = checkpoint_qkv(checkpoint, batch_size=batch, seed=seed)
    else:
        sources = [
            synthetic_qkv(n, head_dim, heads, batch, s, d, smooth_width, seed)
            for d in data for s in scales
        ]
    rows: list[Row] = []
    curves: list[Curve] = []
    for number, src in enumerate(sources, start=1):
        if progress is not None:
            progress(f"q, k, v {number}/{len(sources)}: {src.label}")
        rows += compare_kernels(src, causal, landmarks, weights, seed)
        if not causal:
            curves.append(iteration_curve(src, landmarks, curve_iters))
    settings = dict(
        n=n if checkpoint is None else sources[0].q.shape[-2], landmarks=landmarks,
        head_dim=sources[0].q.shape[-1], heads=sources[0].q.shape[1], causal=causal,
        checkpoint=checkpoint,
    )
    return ApproxReport(rows, curves, settings)


def format_curve(curve: Curve) -> str:
    """One line per curve: the errors by iteration, the minimum marked with *."""
    parts = []
    for i, e in enumerate(curve.errors):
        mark = "*" if i == curve.best_iteration else ""
        parts.append(f"{i}:{e:.3g}{mark}")
    return " ".join(parts)


def table(report: ApproxReport) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the kernel comparison, for rich or markdown output."""
    cols = ["q, k, v", "kernel", "‖Â−A‖/‖A‖", "‖ÂV−AV‖/‖AV‖", "note"]
    rows = []
    for r in report.rows:
        w = "–" if r.weights_error is None else f"{r.weights_error:.3g}"
        o = "–" if r.output_error is None else f"{r.output_error:.3g}"
        rows.append([r.source, r.kernel, w, o, r.note])
    return cols, rows


def curve_lines(report: ApproxReport) -> list[str]:
    """Text lines of the error-vs-iterations and error-vs-λ curves."""
    lines = []
    for c in report.curves:
        lines.append(
            f"{c.source}: cond(W) median {c.cond_median:.3g}; ‖ÂV−AV‖/‖AV‖ by pinv iteration "
            f"(* = minimum): {format_curve(c)}"
        )
        tik = ", ".join(f"λ={lam:g}: {err:.3g}" for lam, err in c.tikhonov)
        lines.append(f"    Tikhonov: {tik}")
    return lines


def markdown(report: ApproxReport) -> str:
    """The whole report as markdown."""
    cols, rows = table(report)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out + [""] + curve_lines(report))
