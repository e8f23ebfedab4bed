"""Speed and memory of metric-tensor attention against standard attention and against the
materialising O(N²k²) formulation.

Three forward + backward passes through a token mixer on x (B, N, C = heads·k):

* ``attention``: ``SelfAttention`` with the softmax kernel (three projections + SDPA);
* ``metric``: ``MetricAttention`` (symmetric metric) — one kernel call on (pM, p, p);
* ``materialised``: the same metric attention computed the way a published CUDA kernel
  for it does (R. Campos, "CUDA kernel of the metric tensor attention", 2024), by
  materialising a tensor indexed by (batch, head, token pair c <= c', feature pair
  a <= b) — memory and time O(N²k²) — written here in PyTorch as a reference
  (:func:`materialised_metric_attention`). It shares the parameters of the ``metric``
  module, so both compute the same function (tested), and it is run only where its
  estimated footprint fits ``max_materialised_gib``; skipped sizes are reported.

Every case runs in a fresh subprocess so that its peak memory can be read on its own:
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak resident set (VmHWM)
minus the resident set just before the timed passes on a CPU (after the warm-up, with
freed heap handed back to the OS; Linux only, ``None`` elsewhere). Times are medians over
``repeats`` after ``warmup`` passes. Ratios are formed between cases of the same run,
which is what is comparable on a shared machine.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from formerlab.bench.measure import (
    Result,
    check_repeats,
    peak_memory_bytes,
    run_json_worker,
    start_peak_memory,
    timed_passes,
)
from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.mixers.metric import MetricAttention
from formerlab.mixers.self_attention import merge_heads, split_heads

METHODS = ("attention", "metric", "materialised")


def materialised_metric_attention(
    mixer: MetricAttention,
    x: Tensor,
    attention_mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Metric attention with the (token pair, feature pair) tensor made explicit.

    With p = Px and m the upper-triangle entries of M, the score of tokens c <= c' is
    r(c, c') = Σ_{a<=b} m_ab · S(c,c'; a,b)/√k where S = p_c^a p_c'^b + p_c^b p_c'^a (halved
    for a = b); S is formed in full, shape (B, H, N(N+1)/2, k(k+1)/2), then contracted
    with m, scattered into the symmetric N × N score matrix, and the softmax weights are
    applied to p. Only the ``symmetric`` metric is supported (the published kernel's
    case). This is a benchmark reference, not a mixer to train with.
    """
    if mixer.metric != "symmetric":
        raise ValueError(
            f"the materialised reference needs metric='symmetric'; got {mixer.metric!r}"
        )
    b, n, _ = x.shape
    k = mixer.head_dim
    p = split_heads(mixer.proj(x), mixer.heads)  # (B, H, N, k)
    ci, cj = torch.triu_indices(n, n, device=x.device)  # token pairs c <= c'
    fa, fb = torch.triu_indices(k, k, device=x.device)  # feature pairs a <= b
    pi, pj = p[:, :, ci], p[:, :, cj]  # (B, H, P, k)
    pairs = pi[..., fa] * pj[..., fb] + pi[..., fb] * pj[..., fa]  # (B, H, P, T): the big one
    weight = mixer.metric_params * torch.where(fa == fb, 0.5, 1.0).to(p.dtype)  # (H, T)
    r = torch.einsum("bhpt,ht->bhp", pairs, weight) / math.sqrt(k)
    # Scatter the pair scores into both triangles of the (symmetric) score matrix.
    scores = r.new_zeros(b, mixer.heads, n * n)
    scores = scores.index_add(-1, ci * n + cj, r)
    scores = scores.index_add(-1, cj * n + ci, r * (ci != cj).to(r.dtype))
    scores = scores.view(b, mixer.heads, n, n)
    allowed = torch.ones(n, n, dtype=torch.bool, device=x.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(b, 1, n, n)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # fully masked rows: zeroed below
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = weights @ p
    if attention_mask is not None:
        out = out * attention_mask[:, None, :, None].to(out.dtype)
    return mixer.out(merge_heads(out))


def materialised_bytes(batch: int, heads: int, n: int, k: int, itemsize: int = 4) -> int:
    """Estimated peak bytes of a forward + backward pass of the materialised reference.

    The pair tensor holds B·H·N(N+1)/2·k(k+1)/2 numbers; forming it keeps the two products,
    their sum and the gathered factors alive for backward, and backward forms as many
    again: about 8 copies in all (an estimate used to decide what to skip).
    """
    pair_numbers = batch * heads * (n * (n + 1) // 2) * (k * (k + 1) // 2)
    return 8 * pair_numbers * itemsize


@dataclass
class Case:
    """One measured configuration."""

    method: str
    n: int
    batch: int = 2
    heads: int = 4
    head_dim: int = 32
    causal: bool = False
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0


def build_case(case: Case) -> tuple[torch.nn.Module, Any, Tensor]:
    """The module, a callable ``fn(x)`` for its forward pass, and the input."""
    from formerlab.mixers.self_attention import SelfAttention

    torch.manual_seed(case.seed)
    dim = case.heads * case.head_dim
    if case.method == "attention":
        module: torch.nn.Module = SelfAttention(dim, case.heads, kernel="softmax")
    else:
        module = MetricAttention(dim, case.heads, kernel="softmax", metric="symmetric")
    module = module.to(case.device)
    if case.method == "materialised":

        def fn(x):
            return materialised_metric_attention(module, x, causal=case.causal)
    else:

        def fn(x):
            return module(x, causal=case.causal)

    x = torch.randn(case.batch, case.n, dim, device=case.device, requires_grad=True)
    return module, fn, x


def run_case(case: Case) -> Result:
    """Measure one case in this process (the subprocess worker's body)."""
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    _, fn, x = build_case(case)
    grad_out = torch.randn(x.shape, device=x.device)

    def step() -> None:
        out = fn(x)
        out.backward(grad_out)
        x.grad = None

    for _ in range(case.warmup):
        step()
    # Peak memory is read over the timed passes only: one-time initialisation (thread
    # pools, library workspaces) stays out, and memory the warm-up freed is handed back
    # to the OS first so that re-using it still shows up in the resident set.
    base = start_peak_memory(case.device)
    times = timed_passes(step, case.repeats, case.device)
    peak = peak_memory_bytes(case.device, base)
    return Result(case.method, case.n, statistics.median(times), peak)


def run_in_subprocess(case: Case, timeout_s: float = 600.0) -> Result:
    """Run ``case`` in a fresh Python process (isolated peak memory)."""
    result, reason = run_json_worker("formerlab.bench.metric", asdict(case), timeout_s)
    return Result(case.method, case.n, skipped=reason) if result is None else Result(**result)


def run_benchmark(
    sizes: tuple[int, ...] = (64, 128, 256, 512, 1024),
    batch: int = 2,
    heads: int = 4,
    head_dim: int = 32,
    causal: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    max_materialised_gib: float = 6.0,
    methods: tuple[str, ...] = METHODS,
    progress: Any = None,
) -> list[Result]:
    """Measure every method at every size (forward + backward); returns one result each.

    ``materialised`` is skipped where :func:`materialised_bytes` exceeds
    ``max_materialised_gib``. ``progress(result)`` is called after each case if given.
    """
    for arg, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim),
                       ("warmup", warmup), ("repeats", repeats)):
        check_positive_int(arg, value, minimum=0 if arg == "warmup" else 1)
    check_repeats(repeats)
    for n in sizes:
        check_positive_int("sizes", n)
    for method in methods:
        check_choice("methods", method, METHODS)
    check_positive_float("max_materialised_gib", max_materialised_gib)
    budget = max_materialised_gib * 2**30
    results = []
    for n in sizes:
        for method in methods:
            estimate = materialised_bytes(batch, heads, n, head_dim)
            if method == "materialised" and estimate > budget:
                result = Result(
                    method, n,
                    skipped=f"skipped: needs ~{estimate / 2**30:.1f} GiB "
                    f"> max_materialised_gib={max_materialised_gib:g}",
                )
            else:
                case = Case(method, n, batch, heads, head_dim, causal, warmup,
                            repeats, threads, device)
                result = run_in_subprocess(case)
            results.append(result)
            if progress is not None:
                progress(result)
    return results


def _ratio(a: float | int | None, b: float | int | None) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    return f"{a / b:.2f}×"


def _measured(r: Result | None, field: str) -> float | None:
    return None if r is None or r.skipped else getattr(r, field)


def _ms(r: Result | None) -> str:
    if r is None:
        return "–"
    return r.skipped.split(":")[0] if r.skipped else f"{r.time_s * 1e3:.1f}"


def _mib(r: Result | None) -> str:
    value = _measured(r, "peak_bytes")
    return "–" if value is None else f"{value / 2**20:.1f}"


def summary_rows(results: list[Result]) -> list[dict[str, str]]:
    """One row per size: times, peak memories and the ratios against the baselines."""
    by = {(r.method, r.n): r for r in results}
    rows = []
    for n in sorted({r.n for r in results}):
        att, met, mat = (by.get((m, n)) for m in METHODS)
        rows.append({
            "N": str(n),
            "attention ms": _ms(att),
            "metric ms": _ms(met),
            "materialised ms": _ms(mat),
            "metric / attention time": _ratio(_measured(met, "time_s"), _measured(att, "time_s")),
            "materialised / metric time": _ratio(
                _measured(mat, "time_s"), _measured(met, "time_s")
            ),
            "attention MiB": _mib(att),
            "metric MiB": _mib(met),
            "materialised MiB": _mib(mat),
            "materialised / metric memory": _ratio(
                _measured(mat, "peak_bytes"), _measured(met, "peak_bytes")
            ),
        })
    return rows


def _worker(argv: list[str]) -> None:
    case = Case(**json.loads(argv[0]))
    print(json.dumps(asdict(run_case(case))))


if __name__ == "__main__":  # the subprocess entry used by run_in_subprocess
    _worker(sys.argv[1:])

