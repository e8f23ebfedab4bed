"""Speed and memory of the decoder-safe (causal) kernels against exact causal attention.

Forward + backward through ``kernel(q, k, v, causal=True)`` on per-head tensors
(B, H, N, D) with gradients for q, k and v, for

* ``softmax``: exact causal attention (``F.scaled_dot_product_attention(is_causal=True)``,
  the fused kernel — the strongest exact baseline PyTorch has);
* ``causal_nystrom``: segment landmarks with the kernel's defaults (a fixed segment size
  s = 32, which a decoder needs for prefix consistency: O(N·(s + N/s)·D), i.e. O(N²·D/32)
  at large N);
* ``linear``: elu+1 feature maps with chunk-wise prefix sums (O(N·D²));
* ``performer``: FAVOR+ with ``num_features`` random features (O(N·m·D)).

Every kernel runs with its registry defaults unless ``options`` say otherwise, and then
its name in the results says so: ``causal_nystrom[segment_size=128]`` (``method_label``),
so a table never shows a tuned setting under a default's name.

Every case runs in a fresh subprocess so that its peak memory is its own: on a GPU
``torch.cuda.max_memory_allocated`` over the timed passes, on a CPU the growth of the
process's peak resident set (VmHWM) over the timed passes (Linux; ``None`` elsewhere).
Times are medians over ``repeats`` passes after ``warmup``; with ``rounds`` > 1 every case
is measured once per round, the rounds interleaved (all cases, then all cases again), and
the median over rounds is kept (a noisy stretch of a shared machine then hits one round of
every case rather than every round of one). Ratios are formed between cases of the same
run, the comparable quantity on a shared machine. Exact attention is skipped above
``max_exact_n`` (its time grows as N² — say so next to the numbers).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from formerlab.bench.measure import (
    SDPA_METHODS,
    Result,
    check_repeats,
    peak_memory_bytes,
    pinned_sdpa,
    run_json_worker,
    start_peak_memory,
    timed_passes,
)
from formerlab.bench.threads import ThreadTimes, time_over_threads
from formerlab.errors import check_choice, check_positive_int

METHODS = ("softmax", "causal_nystrom", "linear", "performer")
ALL_METHODS = METHODS + SDPA_METHODS
SIZES = (1024, 4096, 16384, 32768)


@dataclass
class Case:
    """One configuration to measure."""

    method: str
    n: int
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    options: dict[str, Any] = field(default_factory=dict)
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0


def run_case(case: Case) -> Result:
    """Measure one case in this process (the body of the subprocess worker)."""

    if case.threads is not None:
        torch.set_num_threads(case.threads)
    step, kernel = causal_step(case)
    for _ in range(case.warmup):
        step()
    base = start_peak_memory(case.device)
    times = timed_passes(step, case.repeats, case.device)
    peak = peak_memory_bytes(case.device, base)
    info = kernel.last_info if isinstance(kernel.last_info, dict) else {}
    return Result(case.method, case.n, statistics.median(times), peak, info=dict(info))


def causal_step(case: Case) -> tuple[Callable[[], None], Any]:
    """``(step, kernel)``: one causal forward + backward of ``case`` (inputs built once)."""
    from formerlab import attention

    check_choice("methods", case.method, ALL_METHODS)
    torch.manual_seed(case.seed)
    pinned = case.method in SDPA_METHODS
    # the kernel as users get it: registry defaults, overridden only by what ``options`` give
    kernel = attention.build("softmax" if pinned else case.method, **case.options).to(case.device)
    shape = (case.batch, case.heads, case.n, case.head_dim)
    q, k, v = (torch.randn(shape, device=case.device, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=case.device)

    def step() -> None:
        with pinned_sdpa(case.method, case.device) if pinned else contextlib.nullcontext():
            out = kernel(q, k, v, causal=True)
        out.backward(grad_out)
        q.grad = k.grad = v.grad = None

    return step, kernel


def method_label(method: str, options: dict[str, Any] | None) -> str:
    """``method``, or ``method[key=value, ...]`` when it runs with non-default options."""
    if not options:
        return method
    return f"{method}[{', '.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def thread_scaling(
    n: int, threads: tuple[int, ...], methods: tuple[str, ...] = METHODS, batch: int = 1,
    heads: int = 4, head_dim: int = 64, warmup: int = 1, repeats: int = 3,
    device: str = "cpu", options: dict[str, dict[str, Any]] | None = None,
) -> ThreadTimes:
    """``{method: {threads: ms}}`` at one N, interleaved over thread counts and methods."""
    options = options or {}
    steps = {
        method_label(m, options.get(m)): causal_step(
            Case(m, n, batch, heads, head_dim, dict(options.get(m, {})), device=device))[0]
        for m in methods
    }
    return time_over_threads(steps, threads, warmup, repeats, device)


def run_in_subprocess(case: Case, timeout_s: float = 1800.0) -> Result:
    """Run ``case`` in a fresh Python process (its own peak memory)."""
    result, reason = run_json_worker("formerlab.bench.causal", asdict(case), timeout_s)
    return Result(case.method, case.n, skipped=reason) if result is None else Result(**result)


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["causal_nystrom.segment_size=128", ...]`` -> ``{"causal_nystrom": {"segment_size":
    128}}`` (values parsed as YAML); ``ValueError`` naming an item not METHOD.KEY=VALUE."""
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        target, _, value = item.partition("=")
        method, _, key = target.partition(".")
        if not (method and key and value):
            raise ValueError(f"--option {item!r} is not allowed; expected METHOD.KEY=VALUE")
        options.setdefault(method, {})[key] = yaml.safe_load(value)
    return options


def run_benchmark(
    sizes: tuple[int, ...] = SIZES,
    methods: tuple[str, ...] = METHODS,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    max_exact_n: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[Result], None] | None = None,
    rounds: int = 1,
) -> list[Result]:
    """Measure every method at every size (causal forward + backward); one result each.

    ``options``: per-method kernel options (e.g. ``{"performer": {"num_features": 128}}``);
    a method given options is reported as ``method_label(method, options)``.
    ``max_exact_n``: skip exact ``softmax`` above this N (None = never skip).
    ``rounds``: interleaved rounds; each result is the median over them (peak memory: the
    median too). ``progress(result)`` is called after each case of each round.
    """
    for arg, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        check_positive_int(arg, value)
    check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("repeats", repeats)
    check_positive_int("rounds", rounds)
    check_repeats(repeats * rounds)  # every round is a sample of each case
    for n in sizes:
        check_positive_int("sizes", n)
    for method in methods:
        check_choice("methods", method, ALL_METHODS)
    if max_exact_n is not None:
        check_positive_int("max_exact_n", max_exact_n)
    options = options or {}
    by_case: dict[tuple[int, str], list[Result]] = {}
    for _ in range(rounds):
        for n in sizes:
            for method in methods:
                label = method_label(method, options.get(method))
                exact = method == "softmax" or method in SDPA_METHODS
                if exact and max_exact_n is not None and n > max_exact_n:
                    result = Result(label, n, skipped=f"skipped: N > max_exact_n={max_exact_n}")
                else:
                    case = Case(
                        method, n, batch, heads, head_dim, dict(options.get(method, {})),
                        warmup, repeats, threads, device,
                    )  # fmt: skip
                    result = run_in_subprocess(case)
                    result.method = label
                by_case.setdefault((n, label), []).append(result)
                if progress is not None:
                    progress(result)
    return [median_result(runs) for runs in by_case.values()]


def median_result(runs: list[Result]) -> Result:
    """One result from the rounds of one case: median time and peak (skipped if any was)."""
    first = runs[0]
    skipped = next((r.skipped for r in runs if r.skipped), None)
    if skipped or len(runs) == 1:
        return first if not skipped else Result(first.method, first.n, skipped=skipped)
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return Result(first.method, first.n, statistics.median(r.time_s for r in runs),
                  int(statistics.median(peaks)) if peaks else None, info=dict(first.info))


def _measured(r: Result | None, name: str) -> float | None:
    return None if r is None or r.skipped else getattr(r, name)


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or a <= 0 else f"{b / a:.1f}×"


def summary_rows(results: list[Result], methods: tuple[str, ...] = ALL_METHODS) -> list[dict[str, str]]:
    """One row per size: time and peak memory per method, and speed-ups over exact softmax."""
    by = {(r.method, r.n): r for r in results}
    # labelled methods (``causal_nystrom[segment_size=128]``) sit where their kernel does
    labels = list(dict.fromkeys(r.method for r in results))
    present = [label for m in methods for label in labels if label.split("[")[0] == m]
    rows = []
    for n in sorted({r.n for r in results}):
        row = {"N": str(n)}
        exact_t = _measured(by.get(("softmax", n)), "time_s")
        for m in present:
            r = by.get((m, n))
            t = _measured(r, "time_s")
            row[f"{m} ms"] = (r.skipped or "").split(":")[0] if t is None else f"{t * 1e3:.0f}"
        for m in present:
            if m != "softmax" and "softmax" in present:
                row[f"{m} speed-up"] = _ratio(_measured(by.get((m, n)), "time_s"), exact_t)
        for m in present:
            peak = _measured(by.get((m, n)), "peak_bytes")
            row[f"{m} MiB"] = "–" if peak is None else f"{peak / 2**20:.0f}"
        rows.append(row)
    return rows


def memory_growth(results: list[Result], method: str) -> list[tuple[int, float]]:
    """(N, peak bytes per token) for ``method``: constant when memory grows linearly in N."""
    points = [
        (r.n, r.peak_bytes / r.n)
        for r in results
        if r.method == method and not r.skipped and r.peak_bytes
    ]
    return sorted(points)


if __name__ == "__main__":  # subprocess worker: one JSON case in, one JSON result out
    print(json.dumps(asdict(run_case(Case(**json.loads(sys.argv[1]))))))
