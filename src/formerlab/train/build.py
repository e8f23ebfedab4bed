"""From a validated config to the task and the model that fits it.

Both are built on the CPU whatever ``torch.set_default_device`` says: a task's data and
its seeded draws live there, and CPU-initialised weights make a run the same on every
device (the trainer moves the model to ``train.device``).
"""

from __future__ import annotations

import torch
from torch import nn

from formerlab import attention, data, mixers
from formerlab.data import Task
from formerlab.models import DecoderLM, EncoderClassifier, TokenTagger, position_options
from formerlab.models.block import BlockStack
from formerlab.train.config import ModelConfig, RunConfig


def build_task(cfg: RunConfig) -> Task:
    """The configured task (loads or generates its data, on the CPU)."""
    with torch.device("cpu"):
        return data.build(cfg.task.name, **cfg.task.options)


def check_causal_support(model_cfg: ModelConfig, task: Task) -> None:
    """A decoder task (or ``model.causal: true``) needs a causal mixer/kernel: fail before
    training, naming alternatives."""
    if task.kind != "decoder" and not model_cfg.causal:
        return
    why = f"task {task.name!r} (a decoder task)" if task.kind == "decoder" else "model.causal=true"
    options = model_cfg.build_options()
    kernel = options.get("kernel")
    if kernel is not None and kernel not in attention.available(causal=True):
        raise ValueError(
            f"model.kernel={kernel!r} cannot run causally, which {why} needs; causal kernels: "
            f"{attention.available(causal=True)}"
        )
    if model_cfg.mixer not in mixers.available(causal=True):
        raise ValueError(
            f"model.mixer={model_cfg.mixer!r} cannot run causally, which {why} needs; causal "
            f"mixers: {mixers.available(causal=True)}"
        )


def check_classifier_options(model_cfg: ModelConfig, task: Task) -> None:
    """``model.head`` is for classifiers; a decoder is causal already."""
    if task.kind != "encoder" and model_cfg.head != "linear":
        raise ValueError(f"model.head={model_cfg.head!r} is for encoder (classification) tasks; "
                         f"task {task.name!r} is a {task.kind} task: leave model.head unset")
    if task.kind != "decoder" and not model_cfg.causal and mixers.is_causal_only(model_cfg.mixer):
        raise ValueError(f"model.mixer={model_cfg.mixer!r} runs only causally; task "
                         f"{task.name!r} is a {task.kind} task: set model.causal: true to run its "
                         "blocks causally (then mean-pooled), or pick another mixer")
    if task.kind == "decoder" and model_cfg.causal:
        raise ValueError(f"model.causal is for encoder and tagger tasks; task {task.name!r} is a "
                         "decoder, causal already: leave model.causal unset")


def build_hf_model(m: ModelConfig, task: Task) -> nn.Module:
    """``model.hf``: the local HF checkpoint with its attention swapped, as a formerlab model."""
    from formerlab.integrations.hf_model import HFSequenceModel

    hf = m.hf
    return HFSequenceModel(
        hf.path, task.kind, task.vocab_size, hf.kernel, hf.kernel_options,
        num_classes=task.num_classes, layers=hf.layers, max_len=task.max_len,
    )


def build_model(cfg: RunConfig, task: Task) -> nn.Module:
    """``DecoderLM`` for decoder tasks, ``EncoderClassifier`` for encoder tasks,
    ``TokenTagger`` for tagger tasks (one bidirectional prediction per position); on the CPU."""
    with torch.device("cpu"):
        return _build_model(cfg, task)


def _build_model(cfg: RunConfig, task: Task) -> nn.Module:
    m = cfg.model
    if m.hf is not None:
        return build_hf_model(m, task)
    check_causal_support(m, task)
    check_classifier_options(m, task)
    max_len = m.max_len or task.max_len
    if max_len < task.max_len:
        raise ValueError(
            f"model.max_len={m.max_len} is shorter than task {task.name!r}'s sequences "
            f"({task.max_len}); raise it or leave it unset"
        )
    options = m.build_options()
    body = None
    if m.deq is not None:
        from formerlab.models.deq import DEQStack

        body = DEQStack(
            dim=m.dim, heads=m.heads, mixer=m.mixer,
            mixer_options=position_options(m.mixer, options, m.positions),
            mlp_ratio=m.mlp_ratio, dropout=m.dropout, **m.deq,
        )
    common = dict(
        dim=m.dim, depth=m.depth, heads=m.heads, max_len=max_len, mixer=m.mixer,
        mixer_options=options, mlp_ratio=m.mlp_ratio, dropout=m.dropout, body=body,
        positions=m.positions,
    )
    if task.kind == "decoder":
        return DecoderLM(task.vocab_size, **common)
    if task.num_classes is None:
        raise ValueError(f"{task.kind} task {task.name!r} does not declare num_classes")
    if task.kind == "tagger":
        return TokenTagger(task.vocab_size, task.num_classes, causal=m.causal, **common)
    return EncoderClassifier(
        task.vocab_size, task.num_classes, head=m.head, causal=m.causal, **common
    )


def check_packing(cfg: RunConfig, task: Task, model: nn.Module) -> None:
    """``train.packing: true`` needs a formerlab model whose token mixers take ``cu_seqlens``
    with the model's causal flag, and eager execution: fail before training, naming why."""
    t = cfg.train
    if not t.packing:
        return
    if t.compile:
        raise ValueError("train.packing=true cannot be combined with train.compile=true: every "
                         "packed batch has its own offsets and length, which torch.compile would "
                         "recompile for; set one of them to false")
    causal = task.kind == "decoder" or cfg.model.causal
    if cfg.model.hf is not None:  # the swapped kernel takes the offsets (integrations.hf)
        hf = cfg.model.hf
        causal = task.kind == "decoder"
        if not attention.build(hf.kernel, **hf.kernel_options).packs(causal):
            raise ValueError(
                f"train.packing=true: model.hf.kernel={hf.kernel!r} cannot take cu_seqlens with "
                f"causal={causal}; kernels that can: "
                f"{attention.available(causal=causal, packed=True)}; or set "
                "train.packing: false"
            )
        return
    body = getattr(model, "body", None)
    if not isinstance(body, BlockStack):  # other bodies run packed batches padded, exactly
        return
    for mixer in model.mixers():
        if not mixer.packs(causal):
            kernel = getattr(mixer, "kernel", None)
            what = f"token mixer {cfg.model.mixer!r}"
            if kernel is not None:
                what += f" with kernel {getattr(kernel, 'name', type(kernel).__name__)!r}"
            raise ValueError(
                f"train.packing=true: {what} cannot take cu_seqlens with causal={causal}; set "
                "train.packing: false or pick a mixer / kernel that packs (see "
                "formerlab.attention.available(packed=True))"
            )
