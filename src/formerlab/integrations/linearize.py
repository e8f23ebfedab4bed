"""Linear-family attention in a Hugging Face causal LM: install, imitate, save, reload.

The pieces of linearization that need no trainer (the loop lives in
:mod:`formerlab.experiments.linearize`):

* :func:`apply_mechanism`: :func:`~formerlab.integrations.hf.swap_attention` with a
  registered causal kernel (``"linear"``, ``"performer"``, ...) or with ``"hedgehog"``
  (:class:`~formerlab.attention.hedgehog.HedgehogAttention`, learnable feature maps and an
  optional gate), built per layer with the layer's head count and head size;
* :func:`attention_transfer`: a context in which every swapped layer runs its *original*
  softmax attention (so later layers see exactly the original activations) and computes
  beside it the new mechanism's output and its distance to the original (MSE on outputs,
  optionally the cross-entropy between the attention matrices, as Hedgehog trains its maps;
  Zhang et al., 2024);
* :func:`mechanism_parameters`: the new mechanism's own parameters (feature maps, gates);
* :func:`save_linearized` / :func:`load_linearized`: an HF folder (the model's own weights,
  ``from_pretrained``-loadable) plus ``linearize.json`` (kernel, options, layers) and
  ``linearize.safetensors`` (the mechanism's parameters); loading swaps it back in.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerlab import attention
from formerlab.attention.hedgehog import HedgehogAttention
from formerlab.integrations.hf import (
    LayerAttention,
    restore_attention,
    swap_attention,
    swapped_layers,
)

HEDGEHOG = "hedgehog"
HEDGEHOG_OPTIONS = ("feature_dim", "gate", "gate_init", "chunk_size")
META_FILE = "linearize.json"
WEIGHTS_FILE = "linearize.safetensors"


def mechanisms() -> list[str]:
    """Names :func:`apply_mechanism` takes: ``"hedgehog"`` and the registry's causal kernels
    other than ``softmax``."""
    return sorted([HEDGEHOG, *(n for n in attention.available(causal=True) if n != "softmax")])


def check_mechanism(kernel: str, options: dict[str, Any]) -> None:
    """``ValueError`` naming the kernel / option unless ``apply_mechanism`` can use them."""
    if kernel == HEDGEHOG:
        unknown = sorted(set(options) - set(HEDGEHOG_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown hedgehog option(s) {unknown}; valid options: {list(HEDGEHOG_OPTIONS)}"
            )
        HedgehogAttention(1, 1, **options)  # values checked by the constructor
        return
    if kernel not in attention.available(causal=True) or kernel == "softmax":
        raise ValueError(
            f"kernel={kernel!r} is not a linear-family causal mechanism; expected one of "
            f"{mechanisms()}"
        )
    attention.KERNELS.check_options(kernel, options)


def apply_mechanism(
    model: nn.Module,
    kernel: str,
    options: dict[str, Any] | None = None,
    layers: list[int] | None = None,
) -> nn.Module:
    """Swap ``kernel`` into the self-attention of ``layers`` (default all) of an HF causal
    LM, in place; returns the model. ``kernel="hedgehog"`` gets one
    :class:`HedgehogAttention` per layer, sized from the layer (``options``: feature_dim,
    gate, gate_init, chunk_size); any other name is a registry kernel with ``options``."""
    options = dict(options or {})
    check_mechanism(kernel, options)
    if kernel != HEDGEHOG:
        swap_attention(model, kernel, layers=layers, **options)
    else:
        swap_attention(model, "linear", layers=layers)
        record = model._formerlab_swap
        heads = int(model.config.num_attention_heads)
        device = next(model.parameters()).device
        for module in record.swapped:
            head_dim = int(getattr(module, "head_dim", model.config.hidden_size // heads))
            layer: LayerAttention = module.formerlab_attention
            layer.kernel = HedgehogAttention(heads, head_dim, **options).to(device)
            layer.kernel_name, layer.options = HEDGEHOG, dict(options)
    model._formerlab_linearized = {
        "kernel": kernel,
        "options": options,
        "layers": list(model._formerlab_swap.layers),
    }
    return model


def mechanism_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the swapped layers' kernels (feature maps, gates), in layer order."""
    return [p for layer in swapped_layers(model) for p in layer.kernel.parameters()]


# --------------------------------------------------------------------------- transfer


class _TransferProbe(nn.Module):
    """Stands in for a swapped layer's kernel during attention transfer: returns the
    original softmax attention and records the student's distance to it."""

    def __init__(self, student: nn.Module, attention_ce: float, mse: float) -> None:
        super().__init__()
        self.student = student
        self.teacher = attention.build("softmax")
        self.attention_ce, self.mse = attention_ce, mse
        self.loss: Tensor | None = None
        self.output_mse: Tensor | None = None

    def forward(self, q, k, v, attention_mask=None, causal=False):
        weights = self.attention_ce > 0
        with torch.no_grad():
            ref = self.teacher(
                q, k, v, attention_mask=attention_mask, causal=causal, need_weights=weights
            )
        ref, ref_w = ref if weights else (ref, None)
        got = self.student(
            q, k, v, attention_mask=attention_mask, causal=causal, need_weights=weights
        )
        out, w = got if weights else (got, None)
        mse = F.mse_loss(out.float(), ref.float())
        self.output_mse = mse.detach()
        loss = self.mse * mse
        if weights:
            loss = loss + self.attention_ce * attention_cross_entropy(w, ref_w, attention_mask)
        self.loss = loss
        return ref


def attention_cross_entropy(
    student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """Mean over real queries of -Σ_s teacher_ts · log student_ts (Hedgehog's attention
    distillation loss; Zhang et al., 2024, eq. 4). Rows are (B, H, N, N) distributions."""
    tiny = torch.finfo(torch.float32).tiny
    ce = -(teacher.float() * student.float().clamp_min(tiny).log()).sum(-1)  # (B, H, N)
    if attention_mask is None:
        return ce.mean()
    real = attention_mask[:, None, :].to(ce.dtype).expand_as(ce)
    return (ce * real).sum() / real.sum().clamp_min(1)


class TransferLosses:
    """What :func:`attention_transfer` yields: per-layer losses of the last forward."""

    def __init__(self, probes: list[_TransferProbe]) -> None:
        self._probes = probes

    def total(self) -> Tensor:
        """Sum of the layers' losses (the quantity attention transfer minimises)."""
        losses = [p.loss for p in self._probes]
        if any(loss is None for loss in losses):
            raise ValueError("no forward has run inside attention_transfer yet")
        return torch.stack(losses).sum()

    def output_mse(self) -> list[float]:
        """Per swapped layer, the MSE between the new mechanism's and the original output."""
        return [float(p.output_mse) for p in self._probes]


@contextlib.contextmanager
def attention_transfer(
    model: nn.Module, attention_ce: float = 0.0, mse: float = 1.0
) -> Iterator[TransferLosses]:
    """Inside: the swapped layers of ``model`` output their original softmax attention and
    record the new mechanism's loss against it (``mse`` × output MSE + ``attention_ce`` ×
    attention-matrix cross-entropy); run the model, then ``losses.total().backward()``."""
    if attention_ce < 0 or mse < 0 or attention_ce + mse == 0:
        raise ValueError(
            f"attention_ce={attention_ce}, mse={mse} are not allowed; expected weights >= 0, "
            "not both 0"
        )
    layers = swapped_layers(model)
    if not layers:
        raise ValueError("the model has no swapped attention; call apply_mechanism first")
    kernels = [layer.kernel for layer in layers]
    probes = [_TransferProbe(k, attention_ce, mse) for k in kernels]
    for layer, probe in zip(layers, probes):
        layer.kernel = probe
    try:
        yield TransferLosses(probes)
    finally:
        for layer, kernel in zip(layers, kernels):
            layer.kernel = kernel


# --------------------------------------------------------------------------- save / load


def save_linearized(model: nn.Module, folder: str | Path) -> Path:
    """Save a model made by :func:`apply_mechanism` (LoRA adapters of ``peft`` merged first)
    as an HF folder that :func:`load_linearized` reloads with the mechanism swapped in."""
    from safetensors.torch import save_file

    if hasattr(model, "merge_and_unload"):  # a peft model: fold the adapters in
        model = model.merge_and_unload()
    meta = getattr(model, "_formerlab_linearized", None)
    if meta is None:
        raise ValueError("save_linearized takes a model made by apply_mechanism")
    folder = Path(folder)
    layers = swapped_layers(model)
    kernels = [layer.kernel for layer in layers]
    tensors = {
        f"{i}.{name}": t.detach().cpu().contiguous()
        for i, kernel in zip(meta["layers"], kernels)
        for name, t in kernel.state_dict().items()
    }
    restore_attention(model)
    try:
        model.save_pretrained(str(folder))
    finally:
        apply_mechanism(model, meta["kernel"], meta["options"], meta["layers"])
        for layer, kernel in zip(swapped_layers(model), kernels):
            layer.kernel = kernel  # the trained modules themselves, not fresh ones
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def load_linearized(folder: str | Path, device: str = "cpu") -> nn.Module:
    """The causal LM saved by :func:`save_linearized`, with its mechanism swapped in and its
    trained parameters loaded (eval mode)."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no {META_FILE}: not a folder saved by save_linearized "
            "(`formerlab linearize` writes one in RUN_DIR/model)"
        )
    meta = json.loads((folder / META_FILE).read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    model.to(device)
    apply_mechanism(model, meta["kernel"], meta["options"], meta["layers"])
    tensors = load_file(str(folder / WEIGHTS_FILE), device=device)
    for i, layer in zip(meta["layers"], swapped_layers(model)):
        own = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".", 1)[0] == str(i)}
        layer.kernel.load_state_dict(own, strict=True)
    return model.eval()


__all__ = [
    "HEDGEHOG",
    "TransferLosses",
    "apply_mechanism",
    "attention_cross_entropy",
    "attention_transfer",
    "check_mechanism",
    "load_linearized",
    "mechanism_parameters",
    "mechanisms",
    "save_linearized",
]
