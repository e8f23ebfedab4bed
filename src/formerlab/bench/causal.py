"""Speed and memory of the decoder-safe (causal) kernels against exact causal attention.

Forward + backward through ``kernel(q, k, v, causal=True)`` on per-head tensors
(B, H, N, D) with gradients for q, k and v, for

* ``softmax``: exact causal attention (``F.scaled_dot_product_attention(is_causal=True)``,
  the fused kernel — the strongest exact baseline PyTorch has);
* ``causal_nystrom``: segment landmarks with the kernel's defaults (a fixed segment size
  s = 32, which a decoder needs for prefix consistency: O(N·(s + N/s)·D), i.e. O(N²·D/32)
  at large N);
* ``linear``: elu+1 feature maps with chunk-wise prefix sums (O(N·D²));
* ``performer``: FAVOR+ with ``num_features`` random features (O(N·m·D));
* ``retention``, ``gla``, ``deltanet``, ``gated_deltanet``, ``mamba2``: the chunked linear
  recurrences of :mod:`formerlab.attention.functional` (``chunk_retention``, ``chunk_gla``,
  ``chunk_delta_rule``, ``chunk_gated_delta_rule``, ``ssd``; O(N·C·D + N·D²) for chunks of
  C = 64 tokens) on the same q, k, v seen in their ``[B, T, H, D]`` layout (a transposed
  view), with gates drawn once per case by :func:`formerlab.bench.ops.make_inputs` and
  given gradients too (unit-norm q, k for the delta rules; Mamba-2 with C = q, B = k,
  x = v, one group per head).

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

Streaming (:func:`run_streaming`, cases with ``mode="stream"``): the per-token time of
the decoding step after ``n`` tokens of context, without gradients. Registry kernels run
``kernel.step`` on one new token (``softmax``: a KV-cache step, O(n·D) per token;
``linear``: its constant-size state); the recurrences run their token-by-token op
(``fused_recurrent_*``, ``ssd_recurrent``) on one token from the state that the chunked
op left after the context. Each case builds its context state, then steps ``tokens``
tokens one after another (each from the state the last one returned, as generation
does); the time is the median per-token step, and the state's bytes are recorded.
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

from formerlab.bench import ops
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
#: the chunked linear recurrences of :mod:`formerlab.attention.functional`
RECURRENT_METHODS = ("retention", "gla", "deltanet", "gated_deltanet", "mamba2")
ALL_METHODS = METHODS + RECURRENT_METHODS + SDPA_METHODS
SIZES = (1024, 4096, 16384, 32768)
#: contexts (tokens already seen) at which the streaming step is timed
STREAM_AT = (1024, 8192)
#: tokens stepped (and timed, one by one) per streaming case
STREAM_TOKENS = 64
MODES = ("train", "stream")
#: options each recurrence's chunked op takes from ``--option`` (fla's chunk_gla has none)
RECURRENT_OPTIONS = {m: ("chunk_size",) for m in RECURRENT_METHODS} | {"gla": ()}


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
    mode: str = "train"  # "train": forward + backward; "stream": the decoding step
    tokens: int = STREAM_TOKENS  # streamed tokens timed (mode "stream")


def run_case(case: Case) -> Result:
    """Measure one case in this process (the body of the subprocess worker)."""

    if case.threads is not None:
        torch.set_num_threads(case.threads)
    if check_choice("mode", case.mode, MODES) == "stream":
        return run_stream_case(case)
    step, kernel = causal_step(case)
    for _ in range(case.warmup):
        step()
    base = start_peak_memory(case.device)
    times = timed_passes(step, case.repeats, case.device)
    peak = peak_memory_bytes(case.device, base)
    info = getattr(kernel, "last_info", None)
    info = info if isinstance(info, dict) else {}
    return Result(case.method, case.n, statistics.median(times), peak, info=dict(info))


def causal_step(case: Case) -> tuple[Callable[[], None], Any]:
    """``(step, kernel)``: one causal forward + backward of ``case`` (inputs built once);
    ``kernel`` is None for the recurrences (functional ops)."""
    from formerlab import attention

    check_choice("methods", case.method, ALL_METHODS)
    if case.method in RECURRENT_METHODS:
        return recurrence_step(case), None
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


def recurrence_forward(case: Case) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """``(forward, leaves)``: ``forward()`` runs ``case``'s chunked op on (B, H, N, D)
    tensors q, k, v seen in the op's ``[B, T, H, D]`` layout (transposed views) and
    returns (B, H, N, D); ``leaves``: q, k, v and the gates (drawn once), which all get
    gradients."""
    torch.manual_seed(case.seed)
    shape = (case.batch, case.heads, case.n, case.head_dim)
    q, k, v = (torch.randn(shape, device=case.device, requires_grad=True) for _ in range(3))
    views = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    x = ops.make_inputs(case.method, case.batch, case.n, case.heads, case.head_dim,
                        seed=case.seed, device=case.device, qkv=views)  # fmt: skip

    def forward() -> torch.Tensor:
        return ops.chunked(case.method, x, **case.options).transpose(1, 2)

    return forward, [q, k, v, *ops.leaves(x)]


def recurrence_step(case: Case) -> Callable[[], None]:
    """One forward + backward of ``case``'s chunked op (:func:`recurrence_forward`)."""
    forward, grads = recurrence_forward(case)
    shape = (case.batch, case.heads, case.n, case.head_dim)
    grad_out = torch.randn(shape, device=case.device)

    def step() -> None:
        forward().backward(grad_out)
        for t in grads:
            t.grad = None

    return step


def stream_steps(case: Case) -> tuple[Callable[[], None], Callable[[], Any]]:
    """``(advance, current)`` for a stream after ``case.n`` tokens of context:
    ``advance()`` decodes the next token from the latest state (no gradients),
    ``current()`` is that state. The recurrences start from their chunked op's final
    state and ignore ``case.options`` (they set the chunked op only)."""
    from formerlab import attention

    check_choice("methods", case.method, ALL_METHODS)
    total = case.n + case.warmup + case.tokens
    position = case.n
    if case.method in RECURRENT_METHODS:
        x = ops.make_inputs(case.method, case.batch, total, case.heads, case.head_dim,
                            seed=case.seed, device=case.device, requires_grad=False)  # fmt: skip
        state = ops.context_state(case.method, ops.time_slice(x, 0, case.n))

        def advance() -> None:
            nonlocal state, position
            token = ops.time_slice(x, position, position + 1)
            _, state = ops.stream_step(case.method, token, state)
            position += 1

        return advance, lambda: state
    torch.manual_seed(case.seed)
    pinned = case.method in SDPA_METHODS
    kernel = attention.build("softmax" if pinned else case.method, **case.options).to(case.device)
    shape = (case.batch, case.heads, total, case.head_dim)
    q, k, v = (torch.randn(shape, device=case.device) for _ in range(3))

    def run(start: int, stop: int, state: Any) -> Any:
        with pinned_sdpa(case.method, case.device) if pinned else contextlib.nullcontext():
            return kernel.step(*(t[:, :, start:stop] for t in (q, k, v)), state)[1]

    with torch.no_grad():
        empty = kernel.init_state(case.batch, case.heads, case.head_dim, device=case.device)
        state = run(0, case.n, empty)

    def advance_kernel() -> None:
        nonlocal state, position
        state = run(position, position + 1, state)
        position += 1

    return advance_kernel, lambda: state


def state_bytes(state: Any) -> int:
    """Bytes of a streaming state: a tensor, or a kernel's state dataclass (allocated
    capacity, e.g. a KV cache's preallocated positions)."""
    from formerlab.attention.streaming import state_nbytes

    return state.nbytes if isinstance(state, torch.Tensor) else state_nbytes(state)


def run_stream_case(case: Case) -> Result:
    """Median seconds per streamed token after ``case.n`` tokens; the state's bytes in
    ``info["state_bytes"]``."""
    advance, current = stream_steps(case)
    with torch.no_grad():
        for _ in range(case.warmup):
            advance()
        times = timed_passes(advance, case.tokens, case.device)
    return Result(case.method, case.n, statistics.median(times),
                  info={"state_bytes": float(state_bytes(current()))})  # fmt: skip


def method_label(method: str, options: dict[str, Any] | None) -> str:
    """``method``, or ``method[key=value, ...]`` when it runs with non-default options."""
    if not options:
        return method
    return f"{method}[{', '.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def thread_scaling(
    n: int,
    threads: tuple[int, ...],
    methods: tuple[str, ...] = METHODS,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    device: str = "cpu",
    options: dict[str, dict[str, Any]] | None = None,
) -> ThreadTimes:
    """``{method: {threads: ms}}`` at one N, interleaved over thread counts and methods."""
    options = options or {}
    steps = {
        method_label(m, options.get(m)): causal_step(
            Case(m, n, batch, heads, head_dim, dict(options.get(m, {})), device=device)
        )[0]
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


def check_options(options: dict[str, dict[str, Any]]) -> None:
    """Refuse an option a recurrence's chunked op does not take (``ValueError`` naming
    ``--option``); registry kernels check theirs when they are built."""
    for method, given in options.items():
        allowed = RECURRENT_OPTIONS.get(method)
        unknown = sorted(set(given) - set(allowed or ()))
        if allowed is not None and unknown:
            raise ValueError(
                f"--option {method}.{unknown[0]} is not allowed; {method} takes "
                f"{list(allowed) or 'no options'}"
            )


def _check_arguments(
    batch: int,
    heads: int,
    head_dim: int,
    warmup: int,
    repeats: int,
    rounds: int,
    sizes: tuple[int, ...],
    methods: tuple[str, ...],
    options: dict[str, dict[str, Any]],
    sizes_arg: str = "sizes",
) -> None:
    """The checks every run makes before any work (each error names its argument)."""
    for arg, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        check_positive_int(arg, value)
    check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("repeats", repeats)
    check_positive_int("rounds", rounds)
    for n in sizes:
        check_positive_int(sizes_arg, n)
    for method in methods:
        check_choice("methods", method, ALL_METHODS)
    check_options(options)


def _interleaved(
    sizes: tuple[int, ...],
    methods: tuple[str, ...],
    options: dict[str, dict[str, Any]],
    rounds: int,
    make: Callable[[int, str], Case | str],
    progress: Callable[[Result], None] | None,
) -> list[Result]:
    """Every (size, method) case once per round, rounds interleaved, each case in its own
    subprocess; ``make(n, method)`` gives the case or the reason to skip it. One result
    per case, the median over the rounds."""
    by_case: dict[tuple[int, str], list[Result]] = {}
    for _ in range(rounds):
        for n in sizes:
            for method in methods:
                label = method_label(method, options.get(method))
                case = make(n, method)
                if isinstance(case, str):
                    result = Result(label, n, skipped=case)
                else:
                    result = run_in_subprocess(case)
                    result.method = label
                by_case.setdefault((n, label), []).append(result)
                if progress is not None:
                    progress(result)
    return [median_result(runs) for runs in by_case.values()]


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

    ``options``: per-method kernel options (e.g. ``{"performer": {"num_features": 128}}``;
    the recurrences take ``chunk_size``, except ``gla``); a method given options is
    reported as ``method_label(method, options)``.
    ``max_exact_n``: skip exact ``softmax`` above this N (None = never skip).
    ``rounds``: interleaved rounds; each result is the median over them (peak memory: the
    median too). ``progress(result)`` is called after each case of each round.
    """
    options = options or {}
    _check_arguments(batch, heads, head_dim, warmup, repeats, rounds, sizes, methods, options)
    check_repeats(repeats * rounds)  # every round is a sample of each case
    if max_exact_n is not None:
        check_positive_int("max_exact_n", max_exact_n)

    def make(n: int, method: str) -> Case | str:
        exact = method == "softmax" or method in SDPA_METHODS
        if exact and max_exact_n is not None and n > max_exact_n:
            return f"skipped: N > max_exact_n={max_exact_n}"
        return Case(method, n, batch, heads, head_dim, dict(options.get(method, {})), warmup,
                    repeats, threads, device)  # fmt: skip

    return _interleaved(sizes, methods, options, rounds, make, progress)


def run_streaming(
    contexts: tuple[int, ...] = STREAM_AT,
    methods: tuple[str, ...] = METHODS,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    tokens: int = STREAM_TOKENS,
    warmup: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[Result], None] | None = None,
    rounds: int = 1,
) -> list[Result]:
    """The per-token time of the streaming step after each context length (module doc).

    One result per (context, method): ``time_s`` the median seconds per token over
    ``tokens`` consecutive steps (then the median over ``rounds`` interleaved rounds),
    ``info["state_bytes"]`` the bytes of the state after the last one.
    """
    options = options or {}
    check_positive_int("tokens", tokens)
    _check_arguments(batch, heads, head_dim, warmup, 1, rounds, contexts, methods, options,
                     sizes_arg="contexts")  # fmt: skip

    def make(n: int, method: str) -> Case:
        return Case(method, n, batch, heads, head_dim, dict(options.get(method, {})), warmup,
                    1, threads, device, mode="stream", tokens=tokens)  # fmt: skip

    return _interleaved(contexts, methods, options, rounds, make, progress)


def median_result(runs: list[Result]) -> Result:
    """One result from the rounds of one case: median time and peak (skipped if any was)."""
    first = runs[0]
    skipped = next((r.skipped for r in runs if r.skipped), None)
    if skipped or len(runs) == 1:
        return first if not skipped else Result(first.method, first.n, skipped=skipped)
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return Result(
        first.method,
        first.n,
        statistics.median(r.time_s for r in runs),
        int(statistics.median(peaks)) if peaks else None,
        info=dict(first.info),
    )


def _measured(r: Result | None, name: str) -> float | None:
    return None if r is None or r.skipped else getattr(r, name)


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or a <= 0 else f"{b / a:.1f}×"


def summary_rows(
    results: list[Result], methods: tuple[str, ...] = ALL_METHODS
) -> list[dict[str, str]]:
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


def time_per_1k(results: list[Result], method: str, from_n: int = 0) -> list[tuple[int, float]]:
    """(N, ms per 1k tokens) of ``method`` for N >= ``from_n``: flat when time is linear."""
    return sorted(
        (r.n, r.time_s * 1e3 / (r.n / 1024))
        for r in results
        if r.method == method and not r.skipped and r.time_s and r.n >= from_n
    )


def spread(points: list[tuple[int, float]]) -> float | None:
    """Largest over smallest value of ``points`` (1.0 = perfectly flat; None if empty)."""
    values = [v for _, v in points]
    return max(values) / min(values) if values and min(values) > 0 else None


def stream_rows(results: list[Result]) -> list[dict[str, str]]:
    """One row per method: ms per streamed token and state MiB at each context, and the
    per-token time at the longest context over the shortest."""
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        mine = sorted((r for r in results if r.method == method), key=lambda r: r.n)
        row = {"method": method}
        for r in mine:
            row[f"ms/token @{r.n}"] = (
                (r.skipped or "").split(":")[0] if r.skipped else f"{r.time_s * 1e3:.3f}"
            )
        done = [r for r in mine if not r.skipped]
        if len(mine) > 1:
            ok = len(done) == len(mine)
            row[f"@{mine[-1].n} / @{mine[0].n}"] = (
                f"{mine[-1].time_s / mine[0].time_s:.2f}×" if ok else "–"
            )
        for r in mine:
            nbytes = r.info.get("state_bytes")
            row[f"state MiB @{r.n}"] = "–" if nbytes is None else f"{nbytes / 2**20:.2f}"
        rows.append(row)
    return rows


if __name__ == "__main__":  # subprocess worker: one JSON case in, one JSON result out
    print(json.dumps(asdict(run_case(Case(**json.loads(sys.argv[1]))))))
