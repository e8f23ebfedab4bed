"""Data-parallel training over ``torch.distributed``: the plumbing the loop calls.

A run joins the process group that ``torchrun`` (or ``formerlab train --nproc N``, see
``launch``) describes in its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl on CUDA. Without that environment every
method below is a no-op, and the loop is the single-process loop.

Why several processes reproduce the one-process run (CPU, to float rounding):

- Data: every rank advances the *same* data generator and draws the whole global batch
  (``train.batch_size``), then keeps its own contiguous rows: rank ``r`` of ``W`` gets rows
  ``r*B/W .. (r+1)*B/W``. The shard is deterministic, the union is the one-process batch,
  and the generator state is the same everywhere (one checkpoint serves every rank and every
  world size on ``--resume``).
- Dropout: every rank also shares the global torch RNG. ``ShardDropout`` draws the mask of
  the *global* batch shape (the very call ``nn.Dropout`` makes on CPU) and keeps its rows, so
  rank ``r``'s masks are the rows of the one-process masks; ranks still use different masks.
- Gradients: DDP averages over ranks. A rank's loss is its token-sum divided by the global
  token count, times ``W`` (``weight`` below), so the average is the global mean even when
  ranks hold different numbers of target tokens (answer-only or padded tasks).

Only rank 0 writes (run folder, checkpoints, MLflow, progress bar, sample); evaluation
batches are spread over the ranks and their sums reduced; logged metrics and diagnostics
(pinv, DEQ solver statistics) are averaged over ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from formerlab.data import IGNORE_INDEX, Batch, Task
from formerlab.train.evaluate import evaluate as evaluate_one
from formerlab.train.evaluate import metric_totals

T = TypeVar("T")

#: A collective that waits longer than this raises instead of hanging (seconds).
TIMEOUT_S = float(os.environ.get("FORMERLAB_DIST_TIMEOUT", "600"))
#: Where a rank writes its error for the launcher (set by ``launch``; torchrun has its own).
ERROR_FILE_ENV = "FORMERLAB_ERROR_FILE"


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; ``Distributed()`` is the single-process job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- set-up ---------------------------------------------------------------------------
    def check(self, batch_size: int) -> None:
        """The global batch must split evenly over the ranks."""
        if batch_size % self.world:
            raise ValueError(
                f"train.batch_size={batch_size} is the global batch and must be divisible by "
                f"the number of processes ({self.world}); use a multiple of {self.world}"
            )

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap ``nn.Dropout`` for ``ShardDropout`` (see the module docstring); in place."""
        if self.enabled:
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Dropout:
                        setattr(parent, name, ShardDropout(child.p, self.rank, self.world))
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel`` around ``model`` (the model itself in one process)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        on_cuda = next(model.parameters()).is_cuda
        return DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if on_cuda else None
        )

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0 only; every rank gets rank 0's (picklable) result."""
        if not self.enabled:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # --- a step ---------------------------------------------------------------------------
    def shard(self, batch: Batch, task: Task) -> tuple[Batch, float]:
        """This rank's rows of the global ``batch`` and its loss weight.

        The weight turns the shard's mean loss into ``W * shard_sum / global_count``, so
        that DDP's average over ranks is the global mean (1.0 in one process).
        """
        if not self.enabled:
            return batch, 1.0
        size = batch.inputs.shape[0] // self.world
        rows = slice(self.rank * size, (self.rank + 1) * size)
        mask = batch.attention_mask
        part = Batch(batch.inputs[rows], batch.targets[rows], None if mask is None else mask[rows])
        weight = self.world * _target_count(part, task) / max(_target_count(batch, task), 1)
        return part, weight

    def mean(self, value: Tensor) -> Tensor:
        """Average of a tensor over ranks (the global loss from the ranks' weighted ones)."""
        if not self.enabled:
            return value
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value / self.world

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (so that every rank takes the same branch)."""
        if not self.enabled:
            return flag
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average of scalar metrics over ranks (keys every rank reports)."""
        if not self.enabled:
            return metrics
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, metrics)
        keys = [k for k in metrics if all(k in g for g in gathered)]
        return {k: sum(float(g[k]) for g in gathered) / self.world for k in keys}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, task: Task, split: str, batch_size: int, batches: int,
        device: str, bf16: bool, packing: bool = False,
    ) -> dict[str, float]:
        """``evaluate`` with the fixed evaluation batches dealt round-robin over the ranks
        and their metric sums added up: the same numbers as one process."""
        if not self.enabled:
            return evaluate_one(model, task, split, batch_size, batches, device, bf16,
                                packing=packing)
        totals = metric_totals(model, task, split, batch_size, batches, device, bf16,
                               shard=(self.rank, self.world), packing=packing)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, totals)
        summed: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                summed[key] = summed.get(key, 0.0) + value
        return task.summarize(summed)


class ShardDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is this rank's rows of the global batch's mask.

    Every rank draws the mask of shape ``(W * b, ...)`` from the shared torch RNG, exactly as
    one process's ``nn.Dropout`` would on CPU (``empty_like(x).bernoulli_(1 - p)``, then
    ``/ (1 - p)``), and keeps rows ``rank * b .. (rank + 1) * b``. Costs ``W`` times the RNG
    draws of a plain dropout, which is small next to a forward.
    """

    def __init__(self, p: float, rank: int, world: int) -> None:
        super().__init__(p)
        self.rank, self.world = rank, world

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        b = x.shape[0]
        noise = torch.empty((b * self.world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        noise.bernoulli_(1 - self.p)
        noise = noise[self.rank * b : (self.rank + 1) * b].div_(1 - self.p)
        return x * noise


def _target_count(batch: Batch, task: Task) -> int:
    """How many targets the task's mean loss divides by (sequences or non-ignored tokens)."""
    if task.kind == "encoder":
        return int(batch.targets.numel())
    return int((batch.targets != IGNORE_INDEX).sum())


# --- joining and leaving the process group ------------------------------------------------
def setup(device: str) -> Distributed:
    """Join the job described by the environment (torchrun's variables); one process if
    ``WORLD_SIZE`` is unset or 1. CUDA ranks use the GPU ``LOCAL_RANK`` (nccl)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r} but CUDA is not available on rank {rank}")
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=world,
            timeout=timedelta(seconds=TIMEOUT_S),
        )
    return Distributed(rank, world, local_rank)


def shutdown(sync: bool = False) -> None:
    """Leave the process group (no-op when none was joined).

    ``sync``: meet the other ranks first (a barrier), so no rank tears its connections
    down while another still talks to it (under load, gloo then aborted a finished rank).
    Only on success: after a failure the launcher stops the others.
    """
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment; ``(0, 1)`` outside a job."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def record_failure(error: BaseException) -> str:
    """The one-line message for a failed rank; written to the launcher's error file."""
    rank, world = rank_and_world()
    message = f"rank {rank} of {world} failed: {type(error).__name__}: {error}"
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        Path(path).write_text(json.dumps({
            "rank": rank, "time": time.time(), "message": message,
            "traceback": "".join(traceback.format_exception(error)),
        }))
    return message


# --- the launcher behind `formerlab train --nproc N` ---------------------------------------
def launch(command: Sequence[str], nproc: int, poll_s: float = 0.1) -> int:
    """Run ``command`` as ``nproc`` ranks on this machine (what ``torchrun --nproc_per_node``
    does for ``formerlab train``); return the job's exit code.

    When a rank fails, the others are stopped at once and the message names the first rank
    that failed and its error (ranks that failed only because a peer vanished come later).
    """
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="formerlab-ranks-") as errors:
        port = _free_port()
        procs = []
        for rank in range(nproc):
            env = dict(
                os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                **{ERROR_FILE_ENV: str(Path(errors) / f"rank-{rank}.json")},
            )
            procs.append(subprocess.Popen(list(command), env=env))
        try:
            codes = _wait(procs, poll_s)
        except KeyboardInterrupt:  # the ranks got the SIGINT too: let rank 0 checkpoint
            codes = [p.wait() for p in procs]
            return 130
        failed = [rank for rank, code in enumerate(codes) if code not in (0, None)]
        if not failed:
            return 0
        print(_failure_message(Path(errors), codes, failed[0]), file=sys.stderr)
        return 1


def _wait(procs: list[subprocess.Popen], poll_s: float) -> list[int | None]:
    """Wait for every rank; on the first failure stop the rest (SIGTERM, then SIGKILL)."""
    while True:
        codes = [p.poll() for p in procs]
        if any(code not in (0, None) for code in codes) or all(c is not None for c in codes):
            break
        time.sleep(poll_s)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return codes


def _failure_message(errors: Path, codes: list[int | None], rank: int) -> str:
    """The earliest error any rank recorded, else how the first failed rank died."""
    reports = [json.loads(path.read_text()) for path in sorted(errors.glob("rank-*.json"))]
    if reports:
        first = min(reports, key=lambda r: r["time"])
        return f"formerlab train: {first['message']}; stopped the other ranks"
    code = codes[rank]
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"code {code}"
    return f"formerlab train: rank {rank} of {len(codes)} died ({how}); stopped the other ranks"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
