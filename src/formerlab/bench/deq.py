"""Deep-equilibrium benchmarks: solver speed on DEQ-Transformer fixed points, and the
training memory of a DEQ body against explicit block stacks.

**Solvers.** The fixed-point problem is ``DEQStack``'s: f(z) = block(z + x_hat) - z for
one MetaFormer block (causal softmax attention, MLP ratio 4) at d=256, N=128, B=8, with
x_hat a LayerNorm-ed random injection. ``gain`` multiplies every Linear weight of the
block: gain 1 is the block at initialisation (an easy, strongly contractive problem);
larger gains mimic the weight growth of training and make the problem harder. Each
solver (ours, and the ``torchdeq`` package's when it is installed) solves the same problem
to relative residual ``tol`` = ||f(z) - z|| / ||f(z)||. Reported: iterations per sample
(mean / max), batched f evaluations (counted by wrapping f, the same way for both
libraries), the worst final relative residual, the wall time (the fastest of
``repeats`` runs; the two libraries alternate within each round so that both see the
same machine load), time per f evaluation, and the solver's own overhead per evaluation
= (time - time spent inside f) / evaluations, f being timed around each call of the same
run. torchdeq's residual is its own ``rel_lowest`` (same definition); its iteration count
is its ``nstep``.

**Memory.** One training step (forward, mean-square loss, backward) through the body
only, on a (B, N, d) input. Peak memory is the peak of *new* allocations during the step:
on CUDA ``torch.cuda.max_memory_allocated`` minus the memory held before the step; on CPU
the allocation timeline recorded by ``torch.profiler`` (``profile_memory=True``: every
allocation and free, in order; the peak of the running sum - op granularity, exact in
bytes, deterministic, unlike the process's resident set). Also reported: the bytes autograd
saves for backward (unique storages, parameters excluded, via
``torch.autograd.graph.saved_tensors_hooks``) and the parameter bytes. DEQ rows: the
implicit backward without the Jacobian penalty, the same with every solve forced to 10 or
30 iterations (tol=0, to show that memory does not depend on the iteration count),
DEQStack's default (implicit + Jacobian penalty, whose double backward needs a second
graph of f), and phantom (k=5).

Times are wall-clock on a machine that may be shared; ratios within one run are the
comparable quantity.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from formerlab import mixers, solvers
from formerlab.bench.measure import check_repeats, sync, timed_passes
from formerlab.bench.threads import ThreadTimes, time_over_threads
from formerlab.errors import check_positive_int
from formerlab.models.block import BlockStack, MetaFormerBlock
from formerlab.models.deq import DEQStack, InjectedBlock

OUR_SOLVERS = ("fixed_point", "anderson", "broyden")
TORCHDEQ_SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
DEPTHS = (2, 4, 8, 12)


def torchdeq_available() -> bool:
    """Whether the optional ``torchdeq`` package can be imported."""
    return importlib.util.find_spec("torchdeq") is not None


@dataclass
class SolverRow:
    """One solver on one problem."""

    library: str
    solver: str
    gain: float
    iterations_mean: float
    iterations_max: int
    evaluations: int
    residual_max: float
    converged: float
    time_s: float
    time_per_eval_ms: float
    overhead_per_eval_ms: float


@dataclass
class MemoryRow:
    """One body's training step."""

    body: str
    peak_mib: float
    saved_mib: float
    params_mib: float
    time_s: float
    info: dict[str, float] = field(default_factory=dict)


def deq_problem(
    dim: int = 256, seq: int = 128, batch: int = 8, gain: float = 1.0, heads: int = 4,
    causal: bool = True, seed: int = 0, device: str = "cpu",
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``(f, z0)``: DEQStack's fixed-point function for one random block and injection."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = MetaFormerBlock(dim, mixers.build("attention", dim=dim, heads=heads), 4.0, 0.0)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(gain)
    cell = InjectedBlock(block).to(device).eval()
    x_hat = nn.functional.layer_norm(torch.randn(batch, seq, dim, generator=gen), (dim,)).to(device)

    @torch.no_grad()
    def f(z: Tensor) -> Tensor:
        return cell(z, x_hat, causal=causal)

    return f, torch.zeros_like(x_hat)


def _median_time(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    outputs = []
    times = timed_passes(lambda: outputs.append(fn()), repeats, device)
    return statistics.median(times), outputs[-1]


def _our_solve(name: str, f, z0, tol: float, max_iter: int):
    _, info = solvers.solve_fixed_point(f, z0, method=name, tol=tol, max_iter=max_iter, stop="rel")
    return (
        float(info.iterations.float().mean()), int(info.iterations.max()),
        float(info.lowest_residual.max()), float(info.converged.float().mean()),
    )


def _torchdeq_solve(name: str, f, z0, tol: float, max_iter: int):
    from torchdeq.solver import get_solver

    _, _, info = get_solver(TORCHDEQ_SOLVERS[name])(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel")
    steps, rel = info["nstep"].float(), info["rel_lowest"].float()
    return float(steps.mean()), int(steps.max()), float(rel.max()), float((rel <= tol).float().mean())


def _timed_solve(solve, name: str, f, z0: Tensor, tol: float, max_iter: int, device: str):
    """(total seconds, seconds inside f, f evaluations, solver result) of one solve."""
    calls, inside = [0], [0.0]

    def counted(z: Tensor) -> Tensor:
        sync(device)
        start = time.perf_counter()
        out = f(z)
        sync(device)
        inside[0] += time.perf_counter() - start
        calls[0] += 1
        return out

    sync(device)
    start = time.perf_counter()
    result = solve(name, counted, z0, tol, max_iter)
    sync(device)
    return time.perf_counter() - start, inside[0], calls[0], result


def solver_comparison(
    dim: int = 256, seq: int = 128, batch: int = 8, gains: tuple[float, ...] = (1.0, 2.0, 3.0),
    tol: float = 1e-3, max_iter: int = 100, repeats: int = 3, methods: tuple[str, ...] = OUR_SOLVERS,
    compare_torchdeq: bool = True, device: str = "cpu",
    progress: Callable[[SolverRow], None] | None = None,
) -> list[SolverRow]:
    """Each solver (and torchdeq's, if installed and asked for) on each ``gain``'s problem.

    The libraries alternate within every repeat (so both see the same machine load) and
    the fastest repeat of each is kept; the time spent inside f is measured around each
    call, so the solver overhead is total time minus f time of the same run.
    """
    check_positive_int("repeats", repeats)
    check_repeats(repeats)
    libraries = [("formerlab", _our_solve)]
    if compare_torchdeq and torchdeq_available():
        libraries.append(("torchdeq", _torchdeq_solve))
    rows = []
    for gain in gains:
        f, z0 = deq_problem(dim, seq, batch, gain, device=device)
        for name in methods:
            best: dict[str, tuple[float, float, int, tuple]] = {}
            for round_ in range(repeats + 1):  # round 0 warms up
                for library, solve in libraries:
                    measured = _timed_solve(solve, name, f, z0, tol, max_iter, device)
                    if round_ and (library not in best or measured[0] < best[library][0]):
                        best[library] = measured
            for library, _ in libraries:
                elapsed, inside_f, evals, (it_mean, it_max, res, conv) = best[library]
                row = SolverRow(
                    library, name, gain, it_mean, it_max, evals, res, conv, elapsed,
                    1e3 * elapsed / evals, 1e3 * (elapsed - inside_f) / evals,
                )
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def thread_scaling(
    threads: tuple[int, ...], dim: int = 256, seq: int = 128, batch: int = 8,
    gain: float = 1.0, tol: float = 1e-3, max_iter: int = 100,
    methods: tuple[str, ...] = OUR_SOLVERS, compare_torchdeq: bool = True, warmup: int = 1,
    repeats: int = 3, device: str = "cpu",
) -> ThreadTimes:
    """``{"library solver": {threads: ms}}``: each solve of one problem at each thread
    count, ours and torchdeq's interleaved (``bench.threads``)."""
    f, z0 = deq_problem(dim, seq, batch, gain, device=device)
    libraries = [("formerlab", _our_solve)]
    if compare_torchdeq and torchdeq_available():
        libraries.append(("torchdeq", _torchdeq_solve))
    steps = {
        f"{library} {name}": (lambda s=solve, n=name: s(n, f, z0, tol, max_iter))
        for name in methods for library, solve in libraries
    }
    return time_over_threads(steps, threads, warmup, repeats, device)


@contextlib.contextmanager
def native_stderr_silenced():
    """Drop what native code writes to file descriptor 2 meanwhile: the profiler (Kineto)
    prints ``profiler_start``/``profiler_stop`` and allocator lines there on every use."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(step: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = itertools.accumulate(e.self_cpu_memory_usage for e in events)
    return max(0, max(running, default=0))


def _cuda_peak_bytes(step: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _saved_bytes(forward: Callable[[], Tensor], params: set[int]) -> tuple[Tensor, int]:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(storages.values())


def memory_comparison(
    dim: int = 256, seq: int = 128, batch: int = 8, depths: tuple[int, ...] = DEPTHS,
    heads: int = 4, device: str = "cpu", progress: Callable[[MemoryRow], None] | None = None,
) -> list[MemoryRow]:
    """Training-step peak memory of DEQ bodies vs ``BlockStack`` of each depth."""
    bodies: list[tuple[str, Callable[[], nn.Module]]] = [
        ("DEQ implicit (anderson, tol 1e-3)", lambda: DEQStack(dim, heads, jac_reg=0.0)),
        ("DEQ implicit, 10 iterations", lambda: DEQStack(dim, heads, max_iter=10, tol=0.0, jac_reg=0.0)),
        ("DEQ implicit, 30 iterations", lambda: DEQStack(dim, heads, max_iter=30, tol=0.0, jac_reg=0.0)),
        ("DEQ implicit + jac_reg (default)", lambda: DEQStack(dim, heads)),
        ("DEQ phantom k=5", lambda: DEQStack(dim, heads, backward="phantom", jac_reg=0.0)),
    ]
    bodies += [(f"explicit {k} blocks", lambda k=k: BlockStack(dim, k, heads)) for k in depths]
    x = torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for name, make in bodies:
        torch.manual_seed(0)
        body = make().to(device).train()

        def step(body=body):
            body(x, causal=True).square().mean().backward()

        step()  # warm up; allocates .grad so the measured step holds only activations
        params = {p.untyped_storage().data_ptr() for p in body.parameters()}
        peak = _cuda_peak_bytes(step) if device.startswith("cuda") else _cpu_peak_bytes(step)
        out, saved = _saved_bytes(lambda body=body: body(x, causal=True), params)
        del out
        elapsed, _ = _median_time(step, 3, device)
        info = body.diagnostics() if isinstance(body, DEQStack) else {}
        param_bytes = sum(p.numel() * p.element_size() for p in body.parameters())
        row = MemoryRow(name, peak / 2**20, saved / 2**20, param_bytes / 2**20, elapsed, info)
        rows.append(row)
        if progress:
            progress(row)
    return rows


def solver_table(rows: list[SolverRow]) -> str:
    """Markdown table of ``solver_comparison``, with per-evaluation time ratios to torchdeq."""
    torchdeq = {(r.solver, r.gain): r for r in rows if r.library == "torchdeq"}
    lines = [
        "| gain | library | solver | iters mean / max | f evals | max rel. residual | "
        "converged | time (s) | ms / eval | overhead ms / eval | ms/eval vs torchdeq |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = torchdeq.get((r.solver, r.gain))
        ratio = f"{r.time_per_eval_ms / ref.time_per_eval_ms:.2f}x" if ref and r.library != "torchdeq" else ""
        lines.append(
            f"| {r.gain:g} | {r.library} | {r.solver} | {r.iterations_mean:.1f} / {r.iterations_max} "
            f"| {r.evaluations} | {r.residual_max:.1e} | {100 * r.converged:.0f}% | {r.time_s:.2f} "
            f"| {r.time_per_eval_ms:.1f} | {r.overhead_per_eval_ms:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[MemoryRow]) -> str:
    """Markdown table of ``memory_comparison`` with ratios to the 2-block stack."""
    base = next((r for r in rows if r.body == "explicit 2 blocks"), rows[0])
    lines = [
        "| body | peak MiB (step) | vs 2 blocks | saved activations MiB | params MiB | step s | solver |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        solver = ""
        if r.info:
            fwd = r.info.get("deq_iterations", 0.0)
            bwd = r.info.get("deq_backward_iterations", 0.0)
            solver = f"{fwd:.1f} fwd / {bwd:.1f} bwd iters"
        lines.append(
            f"| {r.body} | {r.peak_mib:.1f} | {r.peak_mib / base.peak_mib:.2f}x | {r.saved_mib:.1f} "
            f"| {r.params_mib:.1f} | {r.time_s:.2f} | {solver} |"
        )
    return "\n".join(lines)


def run(
    dim: int = 256, seq: int = 128, batch: int = 8, gains: tuple[float, ...] = (1.0, 2.0, 3.0),
    depths: tuple[int, ...] = DEPTHS, tol: float = 1e-3, max_iter: int = 100, repeats: int = 3,
    compare_torchdeq: bool = True, device: str = "cpu", echo: Callable[[str], None] = print,
) -> tuple[list[SolverRow], list[MemoryRow]]:
    """Both benchmarks, printing progress and the two markdown tables through ``echo``."""
    echo(f"DEQ solvers: d={dim}, N={seq}, B={batch}, tol={tol:g} (relative), device={device}, "
         f"threads={torch.get_num_threads()}"
         + ("" if torchdeq_available() or not compare_torchdeq else " - torchdeq not installed"))
    srows = solver_comparison(
        dim, seq, batch, gains, tol, max_iter, repeats, compare_torchdeq=compare_torchdeq,
        device=device,
        progress=lambda r: echo(f"  gain {r.gain:g} {r.library:<9} {r.solver:<11} "
                                f"{r.iterations_mean:5.1f} iters  {r.time_s:.2f} s"),
    )
    echo("")
    echo(solver_table(srows))
    echo("")
    echo(f"training-step memory: d={dim}, N={seq}, B={batch}")
    mrows = memory_comparison(
        dim, seq, batch, depths, device=device,
        progress=lambda r: echo(f"  {r.body:<36} peak {r.peak_mib:7.1f} MiB"),
    )
    echo("")
    echo(memory_table(mrows))
    return srows, mrows
