"""Eager vs ``torch.compile`` step time (``formerlab bench compile``).

Three targets:

* ``decoder``: one training step (forward, cross-entropy, backward, AdamW step) of the
  README's demo decoder (``configs/demo-shakespeare.yaml``: d=128, 4 blocks, 4 heads,
  softmax attention, context 128, batch 32, vocabulary 65) on random token ids;
* ``performer``: the same step with ``performer`` attention (m=128 random features)
  redrawing its features after every optimiser step (``redraw_interval=1``, the training
  loop's ``on_optimizer_step``): redraws are buffer writes, so the compiled step is
  neither recompiled nor broken by them;
* ``nystrom``: forward + backward of the Nyström attention module of ``bench nystrom``
  (projections, m=64 landmarks, 6 pinv iterations, conv skip 33) at N tokens.

The eager module and its compiled wrapper share the same parameters and are timed
interleaved, round after round (minimum over rounds, after warm-up). The first compiled
call, which includes compilation, is reported separately as the compile time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from formerlab.bench.measure import sync
from formerlab.errors import check_choice, check_positive_int

TARGETS = ("decoder", "nystrom", "performer")


@dataclass
class CompileRow:
    """One target: eager and compiled step time (ms), compile time (s)."""

    target: str
    shape: str
    eager_ms: float
    compiled_ms: float
    compile_s: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.compiled_ms


def _decoder(
    device: str, batch: int, context: int, kernel: dict | None = None
) -> tuple[nn.Module, Callable, str]:
    from formerlab.models import DecoderLM
    from formerlab.train.loop import on_optimizer_step

    kernel = kernel or {"kernel": "softmax"}
    model = DecoderLM(vocab_size=65, dim=128, depth=4, heads=4, max_len=context,
                      mixer="attention", mixer_options=kernel).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 65, (batch, context + 1), generator=gen).to(device)
    steps = [0]

    def step(net: nn.Module) -> None:
        logits = net(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps[0] += 1
        on_optimizer_step(model, steps[0])  # performer: a redraw between steps

    return model, step, f"B={batch}, N={context}, d=128, 4 blocks"


def _nystrom(device: str, n: int) -> tuple[nn.Module, Callable, str]:
    from formerlab.bench.nystrom import build_module

    module = build_module("nystrom", 256, 4, 64, 33).to(device)
    x = torch.randn(1, n, 256, device=device, requires_grad=True)

    def step(net: nn.Module) -> None:
        net(x).square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return module, step, f"B=1, N={n}, heads=4, d=64, m=64"


def compare(
    target: str, n: int = 4096, batch: int = 32, context: int = 128, warmup: int = 2,
    repeats: int = 5, device: str = "cpu", backend: str = "inductor",
) -> CompileRow:
    """Eager vs compiled step of ``target`` (see the module docs)."""
    check_choice("target", target, TARGETS)
    check_positive_int("repeats", repeats)
    check_positive_int("warmup", warmup, minimum=0)
    from formerlab.train.compile import compile_model

    if target == "nystrom":
        module, step, shape = _nystrom(device, n)
    else:
        kernel = ({"kernel": "performer", "num_features": 128, "redraw_interval": 1}
                  if target == "performer" else None)
        module, step, shape = _decoder(device, batch, context, kernel)
    compiled = compile_model(module, device, backend=backend)
    sync(device)
    start = time.perf_counter()
    step(compiled)  # compiles forward and backward
    sync(device)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        step(module)
        step(compiled)
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(repeats):
        for name, net in (("eager", module), ("compiled", compiled)):
            sync(device)
            start = time.perf_counter()
            step(net)
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return CompileRow(target, shape, best["eager"], best["compiled"], compile_s)


def markdown_table(rows: list[CompileRow], threads: int) -> str:
    """The README table."""
    lines = [f"| target ({threads} thread(s)) | shape | eager ms | compiled ms | speed-up | compile s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.target} | {r.shape} | {r.eager_ms:.1f} | {r.compiled_ms:.1f} | "
                     f"{r.speedup:.2f}× | {r.compile_s:.0f} |")
    return "\n".join(lines)


__all__ = ["TARGETS", "CompileRow", "compare", "markdown_table"]
