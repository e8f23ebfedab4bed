"""Approximation studies on a user's Hugging Face checkpoint (local directories only).

* :func:`capture_qkv`: the per-head q, k, v that every attention layer computes on a text
  (after rotary positions, with grouped kv heads expanded and the model's logit scale
  folded into q), captured through the same attention function the swap uses.
* :func:`approx_report`: every applicable kernel's error against exact attention on those
  q, k, v, layer by layer (encoders: every kernel, bidirectional; decoders: the causal ones),
  plus Nyström's error by pseudoinverse iteration on that model's landmark matrices.
* :func:`loss_study`: what a swap costs the model itself — its own loss on the text
  (masked-LM loss for encoders, next-token loss for decoders) per kernel and option, with
  the forward time relative to the unswapped model.
* :func:`attention_maps`: exact vs approximate attention maps of one layer and head.

Nothing is downloaded: the model and its tokenizer are read from ``model_dir``.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from formerlab import attention
from formerlab.bench.approx import QKV, ApproxReport, compare_kernels, iteration_curve
from formerlab.integrations.hf import (
    attention_modules,
    restore_attention,
    swap_attention,
    swapped_layers,
)

ENCODER_TYPES = ("bert", "roberta", "nystromformer")
MASK_FRACTION = 0.15


# --------------------------------------------------------------------------- loading


def load_study_model(model_dir: str | Path):
    """``(model, tokenizer, kind)`` from a local directory: a masked LM for encoder types,
    a causal LM otherwise; ``kind`` is "encoder" or "decoder"."""
    import transformers

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--hf {str(model_dir)!r} is not a saved Hugging Face model (no config.json)"
        )
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    kind = "encoder" if config.model_type in ENCODER_TYPES else "decoder"
    auto = transformers.AutoModelForMaskedLM if kind == "encoder" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(str(folder), local_files_only=True).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"--hf {str(model_dir)!r} has no tokenizer that loads offline ({error}); save one "
            "with tokenizer.save_pretrained(MODEL_DIR)"
        ) from None
    return model, tokenizer, kind


def encode(tokenizer, text: str, max_tokens: int | None, model) -> Tensor:
    """(1, N) token ids of ``text``, cut to ``max_tokens`` and to the model's positions."""
    from formerlab.integrations.hf_model import max_positions

    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    limits = [x for x in (max_tokens, max_positions(model.config)) if x]
    if limits:
        ids = ids[: min(limits)]
    if len(ids) < 4:
        raise ValueError(f"--text gives {len(ids)} tokens; need at least 4")
    return torch.tensor([ids])


def read_text(path: str | Path) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--text {str(path)!r} is not a file")
    return file.read_text()


# --------------------------------------------------------------------------- capture


@torch.no_grad()
def capture_qkv(model, ids: Tensor, layers: list[int] | None = None) -> tuple[list[QKV], bool]:
    """The q, k, v of every layer (or ``layers``) on ``ids``; returns ``(sources, causal)``."""
    captured: list[QKV] = []
    swap_attention(model, "softmax", layers=layers)
    record = model._formerlab_swap
    try:
        for index, layer in zip(record.layers, swapped_layers(model)):
            def recorder(q, k, v, kpm, causal, index=index):
                captured.append(QKV(f"layer {index}", q.float(), k.float(), v.float(), kpm))
            layer.recorder = recorder
        model(input_ids=ids, **({} if _is_encoder(model) else {"use_cache": False}))
    finally:
        restore_attention(model)
    return captured, record.causal


def _is_encoder(model) -> bool:
    return model.config.model_type in ENCODER_TYPES


def approx_report(
    model_dir: str | Path, text: str, layers: list[int] | None = None, landmarks: int = 64,
    max_tokens: int | None = 512, curve_iters: int = 20, weights: bool = True, seed: int = 0,
) -> ApproxReport:
    """Kernel errors by layer on the model's own q, k, v, and the pinv iteration curve."""
    model, tokenizer, kind = load_study_model(model_dir)
    ids = encode(tokenizer, text, max_tokens, model)
    sources, causal = capture_qkv(model, ids, layers)
    rows, curves = [], []
    for src in sources:
        rows += compare_kernels(src, causal, landmarks, weights, seed)
        curve = iteration_curve(src, landmarks, curve_iters)
        if causal:
            curve.source += " (bidirectional Nyström on its q, k)"
        curves.append(curve)
    settings = dict(n=ids.shape[1], landmarks=landmarks, head_dim=sources[0].q.shape[-1],
                    heads=sources[0].q.shape[1], causal=causal, checkpoint=str(model_dir),
                    kind=kind)
    return ApproxReport(rows, curves, settings)


# --------------------------------------------------------------------------- loss study


@dataclass
class LossRow:
    """The model's loss with one kernel setting; ``time_ratio``: forward time / exact's."""

    kernel: str
    options: dict[str, Any]
    loss: float
    delta: float
    time_ratio: float
    note: str = ""

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kernel} ({shown})" if shown else self.kernel


def default_settings(causal: bool, n: int) -> list[tuple[str, dict[str, Any]]]:
    """The grid of the loss study: Nyström landmarks 16/32/64 × pinv iterations 2–12 and
    the other kernels (encoders); causal Nyström segment sizes and the causal kernels
    (decoders). Settings whose landmark count reaches N (exact) are left out."""
    out: list[tuple[str, dict[str, Any]]] = []
    if causal:
        for s in (2, 4, 8, 16, 32, 64):
            if s < n:
                out.append(("causal_nystrom", {"segment_size": s}))
        out += [("linear", {}), ("performer", {})]
        return out
    for m in (16, 32, 64):
        if m >= n:
            continue
        for iters in (2, 4, 6, 8, 12):
            out.append(("nystrom", {"num_landmarks": m, "pinv_iters": iters}))
        out.append(("landmark", {"num_landmarks": m}))
    for s in (4, 16, 64):
        if s < n:
            out.append(("causal_nystrom", {"segment_size": s}))
    out += [(name, {}) for name in ("linear", "performer", "double_softmax")]
    return [(k, o) for k, o in out if k in attention.KERNELS]


def masked_lm_batch(ids: Tensor, mask_token_id: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """(inputs, labels): ``MASK_FRACTION`` of the positions (at least one, never the first
    or last special token) replaced by the mask token; labels -100 elsewhere."""
    if mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; the masked-LM loss needs one")
    n = ids.shape[1]
    gen = torch.Generator().manual_seed(seed)
    count = max(1, round(MASK_FRACTION * max(n - 2, 1)))
    picked = 1 + torch.randperm(max(n - 2, 1), generator=gen, device=gen.device)[:count]
    labels = torch.full_like(ids, -100)
    labels[0, picked] = ids[0, picked]
    inputs = ids.clone()
    inputs[0, picked] = mask_token_id
    return inputs, labels


def _loss_and_time(model, inputs: Tensor, labels: Tensor, encoder: bool, repeats: int) -> tuple[float, float]:
    extra = {} if encoder else {"use_cache": False}
    times, loss = [], math.nan
    for _ in range(repeats):
        start = time.perf_counter()
        loss = float(model(input_ids=inputs, labels=labels, **extra).loss)
        times.append(time.perf_counter() - start)
    return loss, statistics.median(times)


@torch.no_grad()
def loss_study(
    model_dir: str | Path, text: str, settings: list[tuple[str, dict[str, Any]]] | None = None,
    layers: list[int] | None = None, max_tokens: int | None = 512, repeats: int = 3, seed: int = 0,
) -> tuple[float, list[LossRow], dict[str, Any]]:
    """``(exact loss, rows, facts)``: the model's own loss on ``text`` after each swap."""
    model, tokenizer, kind = load_study_model(model_dir)
    encoder = kind == "encoder"
    ids = encode(tokenizer, text, max_tokens, model)
    if encoder:
        inputs, labels = masked_lm_batch(ids, tokenizer.mask_token_id, seed)
    else:
        inputs, labels = ids, ids  # HF shifts the labels for the next-token loss
    base, base_time = _loss_and_time(model, inputs, labels, encoder, repeats)
    causal = any(bool(getattr(m, "is_causal", False)) for _, _, m in attention_modules(model))
    rows = []
    for name, options in settings or default_settings(causal, ids.shape[1]):
        torch.manual_seed(seed)  # random features
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                swap_attention(model, name, layers=layers, **options)
                loss, t = _loss_and_time(model, inputs, labels, encoder, repeats)
            rows.append(LossRow(name, options, loss, loss - base, t / base_time))
        except ValueError as error:
            rows.append(LossRow(name, options, math.nan, math.nan, math.nan, f"error: {error}"[:100]))
        finally:
            if getattr(model, "_formerlab_swap", None) is not None:
                restore_attention(model)
    facts = {"kind": kind, "n": ids.shape[1], "loss": "masked-LM" if encoder else "next-token",
             "model": Path(model_dir).name, "threads": torch.get_num_threads()}
    return base, rows, facts


def loss_table(base: float, rows: list[LossRow]) -> tuple[list[str], list[list[str]]]:
    cols = ["kernel", "loss", "Δ loss", "Δ %", "time / exact", "note"]
    out = [["exact (unswapped)", f"{base:.4f}", "0", "0", "1", ""]]
    for r in rows:
        pct = r.delta / base * 100 if base else math.nan
        out.append([r.label, f"{r.loss:.4f}", f"{r.delta:+.4f}", f"{pct:+.1f}", f"{r.time_ratio:.2f}", r.note])
    return cols, out


def loss_plot(base: float, rows: list[LossRow], facts: dict[str, Any], path: str | Path) -> Path:
    """Scatter of loss increase vs forward time (relative to exact), one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    kernels = sorted({r.kernel for r in rows})
    for kernel in kernels:
        pts = [r for r in rows if r.kernel == kernel and math.isfinite(r.delta)]
        ax.scatter([r.time_ratio for r in pts], [r.delta for r in pts], label=kernel, s=24)
        for r in pts:
            shown = ",".join(f"{v}" for v in r.options.values())
            if shown:
                ax.annotate(shown, (r.time_ratio, r.delta), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(xlabel="forward time / exact model's (measured; median of repeats)",
           ylabel=f"{facts['loss']} loss increase (nats)",
           title=f"{facts['model']}: loss increase vs cost, N={facts['n']}, exact loss {base:.3f}")
    ax.legend(fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


# --------------------------------------------------------------------------- maps


@dataclass
class Map:
    title: str
    weights: Tensor
    error: float


@torch.no_grad()
def attention_maps(
    model_dir: str | Path, text: str, layer: int = 0, head: int = 0,
    kernels: list[tuple[str, dict[str, Any]]] = (), landmarks: int | None = None,
    max_tokens: int | None = 256,
) -> tuple[list[str], list[Map], dict[str, Any]]:
    """``(tokens, maps, facts)``: exact attention of one layer and head of the model on
    ``text``, then each kernel's (implied) weights on the same q, k, v with its error.

    Default kernels: Nyström (6 iterations, exact pinv) for encoders, causal Nyström for
    decoders; ``landmarks`` default N // 4 (at least 2)."""
    model, tokenizer, kind = load_study_model(model_dir)
    ids = encode(tokenizer, text, max_tokens, model)
    count = len(attention_modules(model))
    if not 0 <= layer < count:
        raise ValueError(f"layer={layer} is not allowed; the model has layers 0..{count - 1}")
    (src,), causal = capture_qkv(model, ids, [layer])
    if not 0 <= head < src.q.shape[1]:
        raise ValueError(f"head={head} is not allowed; layer {layer} has heads 0..{src.q.shape[1] - 1}")
    n = ids.shape[1]
    m = landmarks or max(2, n // 4)
    q, k, v = (t.double() for t in (src.q, src.k, src.v))
    requested = list(kernels) or (
        # causal_nystrom takes a fixed segment size (prefix consistency): about m landmarks
        [("causal_nystrom", {"segment_size": -(-n // m)})] if causal else
        [("nystrom", {"num_landmarks": m, "pinv_iters": 6}), ("nystrom", {"num_landmarks": m, "pinv_reg": "exact"})]
    )
    _, exact = attention.build("softmax")(q, k, v, causal=causal, need_weights=True)
    exact = exact[0, head].float()
    maps = [Map("exact softmax" + (" (causal)" if causal else ""), exact, 0.0)]
    for name, options in requested:
        takes = attention.KERNELS.entry(name).options()
        if "num_landmarks" in takes and not (causal and "segment_size" in takes):
            options = {"num_landmarks": m, **options}
        kernel = attention.build(name, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, w = kernel(q, k, v, causal=causal, need_weights=True)
        w = w[0, head].float()
        shown = ", ".join(f"{a}={b}" for a, b in options.items())
        err = float((w - exact).norm() / exact.norm().clamp_min(1e-30))
        maps.append(Map(f"{name} ({shown})" if shown else name, w, err))
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    facts = {"layer": layer, "head": head, "causal": causal, "num_landmarks": m,
             "task": Path(model_dir).name, "n": n, "kind": kind}
    return tokens, maps, facts


__all__ = [
    "LossRow",
    "Map",
    "approx_report",
    "attention_maps",
    "capture_qkv",
    "default_settings",
    "load_study_model",
    "loss_plot",
    "loss_study",
    "loss_table",
    "masked_lm_batch",
]
