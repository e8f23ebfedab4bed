"""The chunked linear-recurrence ops against fla's naive chunked references and against
the token-by-token recurrence: forward + backward time and the memory autograd keeps.

For every mechanism of :mod:`formerlab.attention.functional` (``MECHANISMS``), on one set
of inputs in fla's layout ``[B, T, H, D]`` (B = 1, H = 4, K = V = 64, float32 by default;
gates drawn once, see :func:`make_inputs`), three forms of the same map are timed,
forward + backward with gradients for every input (gates included):

* **ours**: the chunked op (``chunk_retention``, ``chunk_simple_gla``, ``chunk_gla``,
  ``chunk_delta_rule``, ``chunk_gated_delta_rule``, ``ssd``), chunks of 64 tokens;
* **fla**: fla-core's pure-PyTorch naive chunked reference on the same inputs, chunks of
  64, loaded by file path (importing the ``fla`` package needs Triton):
  ``naive_chunk_simple_gla`` for simple GLA, for retention (its fixed per-head decays given
  per token) and for Mamba-2's SSD (which is simple GLA with ``q = C``, ``k = B``,
  ``v = dt * x``, ``g = dt * A`` and scale 1; Dao & Gu, 2024, arXiv:2405.21060, Sec. 3-4);
  ``delta_rule_chunkwise`` for DeltaNet and ``naive_chunk_gated_delta_rule`` for Gated
  DeltaNet. fla has no naive chunked GLA (per-key decay): that row has no peer. Without
  fla-core installed the peer cells say so;
* **recurrent**: our token-by-token recurrence (``fused_recurrent_*``, ``ssd_recurrent``),
  whose autograd graph keeps one ``[K, V]`` state per token.

Before anything is timed, the forms are run once on the benchmark's own inputs with the
same output gradient, and the outputs and all input gradients compared: the largest
absolute difference is a column of the table, and a difference above ``tolerance``
relative to the reference's largest value is flagged (a warning, and ``agrees`` False),
so a table never shows the speed of a wrong computation.

Times come from :func:`formerlab.bench.threads.time_over_threads`: every round visits
every thread count and every form once (orders reversed on alternate rounds); a time is
the minimum over the rounds, a ratio the median of the per-round (paired) ratios.

Memory: the bytes of the tensors autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``; every storage counted once, the inputs
themselves left out), for the chunked op and the recurrence at two sizes: per token it is
flat for both (linear in N), but the recurrence keeps ``[K, V]`` states per token while
the chunked op keeps one per chunk.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from formerlab.attention import functional as fn
from formerlab.bench.measure import check_repeats
from formerlab.bench.threads import ThreadTimes, time_over_threads
from formerlab.errors import check_choice, check_positive_float, check_positive_int

#: the mechanisms measured, in table order
MECHANISMS = ("retention", "simple_gla", "gla", "deltanet", "gated_deltanet", "mamba2")
#: the chunk length of every chunked form (ours and fla's)
CHUNK = 64
#: a difference between two forms above this, relative to the reference, is flagged
TOLERANCE = 1e-3
FORMS = ("ours", "fla", "recurrent")

#: mechanism -> (our chunked op, our recurrent op), the names shown in the tables
OP_NAMES = {
    "retention": ("chunk_retention", "fused_recurrent_retention"),
    "simple_gla": ("chunk_simple_gla", "fused_recurrent_simple_gla"),
    "gla": ("chunk_gla", "fused_recurrent_gla"),
    "deltanet": ("chunk_delta_rule", "fused_recurrent_delta_rule"),
    "gated_deltanet": ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "mamba2": ("ssd", "ssd_recurrent"),
}

Inputs = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- inputs
def log_decays(shape: tuple[int, ...], generator: torch.Generator, device: Any) -> torch.Tensor:
    """Per-token log decays ``logsigmoid(N(4, 1))``: decays ``e^g`` of about 0.88-0.998
    (two standard deviations), i.e. memories of roughly 8 to 400 tokens."""
    x = torch.randn(shape, generator=generator, device=device) + 4.0
    return F.logsigmoid(x)


def make_inputs(
    mechanism: str,
    batch: int,
    seq_len: int,
    heads: int,
    dim: int,
    *,
    seed: int = 0,
    device: Any = "cpu",
    requires_grad: bool = True,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Inputs:
    """Random inputs of ``mechanism`` in fla's layout, gates drawn once.

    ``q, k, v`` are ``[B, T, H, D]`` standard normal (or ``qkv``, e.g. views of per-head
    tensors); the gates are ``g`` (:func:`log_decays`, ``[B, T, H]``, per key ``[B, T, H,
    D]`` for GLA), ``beta = sigmoid(N(0, 1))`` ``[B, T, H]`` (the delta rules), and for
    Mamba-2 step sizes ``dt`` log-uniform in [1e-3, 1e-1] ``[B, T, H]`` and rates ``A``
    uniform in [-16, -1] ``[H]`` (Mamba-2's initialisation ranges). Every tensor made here
    is a leaf with ``requires_grad``.
    """
    check_choice("mechanism", mechanism, MECHANISMS)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, seq_len, heads)

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.requires_grad_(requires_grad)

    if qkv is None:
        qkv = tuple(torch.randn(*shape, dim, generator=gen, device=device) for _ in range(3))
        qkv = tuple(leaf(x) for x in qkv)
    x: Inputs = dict(zip("qkv", qkv))
    if mechanism in ("simple_gla", "gated_deltanet"):
        x["g"] = leaf(log_decays(shape, gen, device))
    if mechanism == "gla":
        x["g"] = leaf(log_decays((*shape, dim), gen, device))
    if mechanism in ("deltanet", "gated_deltanet"):
        x["beta"] = leaf(torch.randn(shape, generator=gen, device=device).sigmoid())
    if mechanism == "mamba2":
        lo, hi = math.log(1e-3), math.log(1e-1)
        x["dt"] = leaf((lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)).exp())
        x["A"] = leaf(-(1.0 + 15.0 * torch.rand(heads, generator=gen, device=device)))
    return x


def time_slice(x: Inputs, start: int, stop: int) -> Inputs:
    """Tokens ``start:stop`` of every per-token tensor (``[B, T, ...]``); per-head ones
    (``A [H]``) stay whole."""
    return {name: t[:, start:stop] if t.dim() >= 3 else t for name, t in x.items()}


def leaves(x: Inputs) -> list[torch.Tensor]:
    """The tensors of ``x`` that receive gradients."""
    return [t for t in x.values() if t.is_leaf and t.requires_grad]


# ----------------------------------------------------------------------------- our forms
def _unit(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm keys (and queries): what the delta rule needs to be stable; done outside
    every form alike, so that all of them compute the same map."""
    return F.normalize(x, dim=-1)


def _ssd(op: Callable, x: Inputs, initial_state=None, output_final_state=False, **options):
    """``ssd`` / ``ssd_recurrent`` with one group per head (``C = q``, ``B = k``, ``x = v``)
    in the ``(o, final_state)`` convention of the fla ops."""
    y, h = op(x["v"], x["dt"], x["A"], x["k"], x["q"], initial_states=initial_state,
              return_final_states=True, **options)  # fmt: skip
    return y, (h if output_final_state else None)


_CHUNKED: dict[str, Callable[..., tuple[torch.Tensor, Any]]] = {
    "retention": lambda x, **kw: fn.chunk_retention(x["q"], x["k"], x["v"], **kw),
    "simple_gla": lambda x, **kw: fn.chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"], **kw),
    "gla": lambda x, **kw: fn.chunk_gla(x["q"], x["k"], x["v"], x["g"], **kw),
    "deltanet": lambda x, **kw: fn.chunk_delta_rule(
        _unit(x["q"]), _unit(x["k"]), x["v"], x["beta"], **kw),
    "gated_deltanet": lambda x, **kw: fn.chunk_gated_delta_rule(
        _unit(x["q"]), _unit(x["k"]), x["v"], x["g"], x["beta"], **kw),
    "mamba2": lambda x, **kw: _ssd(fn.ssd, x, **kw),
}  # fmt: skip

_RECURRENT: dict[str, Callable[..., tuple[torch.Tensor, Any]]] = {
    "retention": lambda x, **kw: fn.fused_recurrent_retention(x["q"], x["k"], x["v"], **kw),
    "simple_gla": lambda x, **kw: fn.fused_recurrent_simple_gla(
        x["q"], x["k"], x["v"], g=x["g"], **kw),
    "gla": lambda x, **kw: fn.fused_recurrent_gla(x["q"], x["k"], x["v"], gk=x["g"], **kw),
    "deltanet": lambda x, **kw: fn.fused_recurrent_delta_rule(
        _unit(x["q"]), _unit(x["k"]), x["v"], beta=x["beta"], **kw),
    "gated_deltanet": lambda x, **kw: fn.fused_recurrent_gated_delta_rule(
        _unit(x["q"]), _unit(x["k"]), x["v"], g=x["g"], beta=x["beta"], **kw),
    "mamba2": lambda x, **kw: _ssd(fn.ssd_recurrent, x, **kw),
}  # fmt: skip


def chunked(mechanism: str, x: Inputs, **options: Any) -> torch.Tensor:
    """Our chunked op's output ``[B, T, H, V]`` (``options``: extra keywords of the op,
    e.g. ``chunk_size``)."""
    return _CHUNKED[mechanism](x, **options)[0]


def recurrent(mechanism: str, x: Inputs) -> torch.Tensor:
    """Our token-by-token recurrence's output ``[B, T, H, V]``."""
    return _RECURRENT[mechanism](x)[0]


def context_state(mechanism: str, x: Inputs) -> torch.Tensor:
    """The state after the tokens of ``x`` (chunked op, no gradients)."""
    with torch.no_grad():
        return _CHUNKED[mechanism](x, output_final_state=True)[1]


def stream_step(
    mechanism: str, x: Inputs, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One streaming step: the recurrence on the new tokens of ``x`` from ``state``;
    returns ``(o, new_state)``."""
    return _RECURRENT[mechanism](x, initial_state=state, output_final_state=True)


# ----------------------------------------------------------------------------- fla's forms
class PeerUnavailable(Exception):
    """fla's reference cannot run here; the message says why (shown in the table)."""


@functools.cache
def load_fla_naive(relative: str) -> Any:
    """fla-core's pure-PyTorch module ``fla/ops/<relative>``, loaded by file path (the
    ``fla`` package import needs Triton; the naive modules need torch and einops only).

    Raises:
        PeerUnavailable: fla-core (or einops) is not installed, or the file is missing.
    """
    try:
        dist = importlib.metadata.distribution("fla-core")
    except importlib.metadata.PackageNotFoundError:
        raise PeerUnavailable("fla-core not installed") from None
    path = Path(str(dist.locate_file(f"fla/ops/{relative}")))
    if not path.is_file():
        raise PeerUnavailable(f"fla/ops/{relative} not in fla-core {dist.version}")
    name = "formerlab_fla_peer_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise PeerUnavailable(f"fla/ops/{relative} does not import: {error}") from None
    return module


def _fla_simple_gla(x: Inputs, g: torch.Tensor, v=None, scale=None) -> torch.Tensor:
    naive = load_fla_naive("simple_gla/naive.py").naive_chunk_simple_gla
    return naive(x["q"], x["k"], x["v"] if v is None else v, g, chunk_size=CHUNK, scale=scale)[0]


def _fla_retention(x: Inputs) -> torch.Tensor:
    batch, seq_len, heads = x["q"].shape[:3]
    gamma = fn.retention_log_decay(heads, torch.float32, x["q"].device)
    return _fla_simple_gla(x, gamma.expand(batch, seq_len, heads))


def _fla_deltanet(x: Inputs) -> torch.Tensor:
    seq_len = x["q"].shape[1]
    if seq_len % CHUNK:
        raise PeerUnavailable(f"delta_rule_chunkwise needs N % {CHUNK} == 0, got N={seq_len}")
    naive = load_fla_naive("delta_rule/naive.py").delta_rule_chunkwise
    q, k, v, beta = (t.transpose(1, 2) for t in (_unit(x["q"]), _unit(x["k"]), x["v"], x["beta"]))
    return naive(q, k, v, beta, chunk_size=CHUNK)[0].transpose(1, 2)


def _fla_gated_deltanet(x: Inputs) -> torch.Tensor:
    naive = load_fla_naive("gated_delta_rule/naive.py").naive_chunk_gated_delta_rule
    q, k = _unit(x["q"]), _unit(x["k"])
    return naive(q, k, x["v"], x["g"], x["beta"], chunk_size=CHUNK)[0]


def _fla_mamba2(x: Inputs) -> torch.Tensor:
    dt = x["dt"]
    return _fla_simple_gla(x, dt * x["A"], v=x["v"] * dt.unsqueeze(-1), scale=1.0)


def _no_fla_gla(x: Inputs) -> torch.Tensor:
    raise PeerUnavailable("fla has no naive chunked GLA")


_FLA: dict[str, tuple[str, Callable[[Inputs], torch.Tensor]]] = {
    "retention": ("naive_chunk_simple_gla", _fla_retention),
    "simple_gla": ("naive_chunk_simple_gla", lambda x: _fla_simple_gla(x, x["g"])),
    "gla": ("–", _no_fla_gla),
    "deltanet": ("delta_rule_chunkwise", _fla_deltanet),
    "gated_deltanet": ("naive_chunk_gated_delta_rule", _fla_gated_deltanet),
    "mamba2": ("naive_chunk_simple_gla", _fla_mamba2),
}


def fla_reference(mechanism: str, x: Inputs) -> torch.Tensor:
    """fla's naive chunked reference's output ``[B, T, H, V]`` on ``x``.

    Raises:
        PeerUnavailable: it cannot run here (not installed, no such reference, a length
            it does not take).
    """
    return _FLA[mechanism][1](x)


# ----------------------------------------------------------------------------- measuring
def forms(mechanism: str, x: Inputs) -> dict[str, Callable[[], torch.Tensor]]:
    """``{form: forward}`` of ``mechanism`` on ``x`` for the forms ``FORMS`` (calling
    ``"fla"`` raises :class:`PeerUnavailable` where fla's reference cannot run)."""
    return {
        "ours": lambda: chunked(mechanism, x),
        "fla": lambda: fla_reference(mechanism, x),
        "recurrent": lambda: recurrent(mechanism, x),
    }


def output_and_grads(
    forward: Callable[[], torch.Tensor], x: Inputs, grad_out: torch.Tensor
) -> list[torch.Tensor]:
    """The output of ``forward()`` and the gradients of every input for ``grad_out``."""
    o = forward()
    grads = torch.autograd.grad(o, leaves(x), grad_out)
    return [o.detach(), *grads]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """``(max |a - b|, max |b|)`` over matching tensors (outputs and gradients)."""
    diff = max(float((s - t).abs().max()) for s, t in zip(a, b))
    return diff, max(float(t.abs().max()) for t in b)


def step_fn(
    forward: Callable[[], torch.Tensor], x: Inputs, grad_out: torch.Tensor
) -> Callable[[], None]:
    """One timed pass: forward, backward with ``grad_out``, gradients dropped."""
    grads = leaves(x)

    def step() -> None:
        forward().backward(grad_out)
        for t in grads:
            t.grad = None

    return step


def saved_bytes(forward: Callable[[], torch.Tensor], x: Inputs) -> int:
    """Bytes autograd keeps for the backward of ``forward()``: every saved tensor's
    storage counted once, the storages of the inputs ``x`` left out."""
    inputs = {t.untyped_storage().data_ptr() for t in x.values()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


@dataclass
class OpsResult:
    """One mechanism's measurements (times in ms per thread count)."""

    mechanism: str
    chunk_op: str
    recurrent_op: str
    fla_op: str
    times: dict[str, dict[int, float]] = field(default_factory=dict)  # form -> threads -> ms
    ratios: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # form -> paired
    skipped: dict[str, str] = field(default_factory=dict)  # form -> why it did not run
    diff: dict[str, float] = field(default_factory=dict)  # form -> max |form - ours|
    agrees: dict[str, bool] = field(default_factory=dict)
    saved: dict[str, dict[int, int]] = field(default_factory=dict)  # form -> N -> bytes
    state_bytes: int = 0  # one [K, V] state of every head (the per-token unit of a recurrence)


def check_agreement(
    mechanism: str,
    x: Inputs,
    grad_out: torch.Tensor,
    runs: dict,
    result: OpsResult,
    tolerance: float,
) -> None:
    """Run every form once and compare it with ours (outputs and input gradients); a form
    that cannot run is moved from ``runs`` to ``result.skipped``."""
    ours = output_and_grads(runs["ours"], x, grad_out)
    for form in [f for f in ("fla", "recurrent") if f in runs]:
        try:
            theirs = output_and_grads(runs[form], x, grad_out)
        except PeerUnavailable as reason:
            result.skipped[form] = str(reason)
            del runs[form]
            continue
        diff, scale = max_difference(ours, theirs)
        result.diff[form] = diff
        result.agrees[form] = diff <= tolerance * max(1.0, scale)
        if not result.agrees[form]:
            warnings.warn(
                f"{mechanism}: {OP_NAMES[mechanism][0]} and the {form} form differ by "
                f"{diff:.2e} (largest value {scale:.2e}, tolerance {tolerance:g} relative)",
                stacklevel=2,
            )


def run_benchmark(
    n: int = 4096,
    mechanisms: tuple[str, ...] = MECHANISMS,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    threads: tuple[int, ...] | None = None,
    rounds: int = 3,
    warmup: int = 1,
    memory_sizes: tuple[int, ...] | None = None,
    recurrent_form: bool = True,
    tolerance: float = TOLERANCE,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[OpsResult]:
    """Time every mechanism's forms at ``n`` tokens and measure their saved memory.

    Args:
        n, batch, heads, head_dim: the size (``[B, T, H, D]``, K = V = ``head_dim``).
        mechanisms: a subset of ``MECHANISMS``.
        threads: torch thread counts, each timed in every round (None: the current one).
        rounds: interleaved timing rounds (minimum and paired ratios over them).
        warmup: untimed passes of every form at every thread count.
        memory_sizes: the N at which saved bytes are measured (default ``n // 4`` and
            ``n``); an empty tuple skips the memory measurement.
        recurrent_form: also time the token-by-token recurrence (slow: it is the point).
        tolerance: relative difference above which a form's disagreement is flagged.
        progress: called with a line per step of the work.

    Raises:
        ValueError: a bad argument, named, before any work.
    """
    for arg, value in (("n", n), ("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        check_positive_int(arg, value)
    check_positive_int("warmup", warmup, minimum=0)
    check_repeats(rounds, "rounds")
    check_positive_float("tolerance", tolerance)
    for mechanism in mechanisms:
        check_choice("mechanisms", mechanism, MECHANISMS)
    if not mechanisms:
        raise ValueError(f"mechanisms=() is not allowed; expected some of {list(MECHANISMS)}")
    threads = tuple(threads or (torch.get_num_threads(),))
    for count in threads:
        check_positive_int("threads", count)
    memory_sizes = (max(n // 4, 1), n) if memory_sizes is None else tuple(memory_sizes)
    for size in memory_sizes:
        check_positive_int("memory_sizes", size)
    say = progress or (lambda line: None)
    results, steps = [], {}
    for mechanism in mechanisms:
        chunk_op, recurrent_op = OP_NAMES[mechanism]
        result = OpsResult(mechanism, chunk_op, recurrent_op, _FLA[mechanism][0])
        x = make_inputs(mechanism, batch, n, heads, head_dim, seed=seed, device=device)
        grad_out = torch.randn(x["v"].shape, generator=torch.Generator(device).manual_seed(seed + 1),
                               device=device)  # fmt: skip
        runs = forms(mechanism, x)
        if not recurrent_form:
            del runs["recurrent"]
            result.skipped["recurrent"] = "not run (--no-recurrent)"
        say(f"{mechanism}: checking the forms agree")
        check_agreement(mechanism, x, grad_out, runs, result, tolerance)
        steps.update({(mechanism, form): step_fn(f, x, grad_out) for form, f in runs.items()})
        result.state_bytes = heads * head_dim * head_dim * 4
        for size in memory_sizes:
            say(f"{mechanism}: saved tensors at N={size}")
            small = make_inputs(mechanism, batch, size, heads, head_dim, seed=seed, device=device)
            for form in ("ours", "recurrent"):
                if form == "recurrent" and not recurrent_form:
                    continue
                forward = forms(mechanism, small)[form]
                result.saved.setdefault(form, {})[size] = saved_bytes(forward, small)
        results.append(result)
    say(f"timing {len(steps)} forms x {len(threads)} thread count(s) x {rounds} rounds")
    named = {f"{m}/{form}": step for (m, form), step in steps.items()}
    times = time_over_threads(named, threads, warmup, rounds, device)
    for result in results:
        _collect(result, times, threads)
    return results


def _collect(result: OpsResult, times: ThreadTimes, threads: tuple[int, ...]) -> None:
    """Times and paired ratios (form over ours) of ``result``'s forms."""
    ours = f"{result.mechanism}/ours"
    for form in FORMS:
        name = f"{result.mechanism}/{form}"
        if name not in times:
            continue
        result.times[form] = dict(times[name])
        result.ratios[form] = {t: times.paired_ratios(name, ours, t) for t in threads}


# ----------------------------------------------------------------------------- tables
def _ratio(ratios: list[float]) -> str:
    med = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{med:.1f}×"
    return f"{med:.1f}× ({min(ratios):.1f}–{max(ratios):.1f})"


def _diff(result: OpsResult, form: str) -> str:
    if form in result.skipped:
        return "–"
    flag = "" if result.agrees.get(form, True) else " (> tolerance!)"
    return f"{result.diff[form]:.1e}{flag}"


def time_rows(results: list[OpsResult]) -> list[dict[str, str]]:
    """One row per mechanism and thread count: ms of each form, the paired ratios
    fla / ours and recurrent / ours (median, range), and the largest differences."""
    rows = []
    for r in results:
        for t in sorted(r.times["ours"]):
            row = {"mechanism": r.mechanism, "ours": r.chunk_op, "threads": str(t),
                   "ours ms": f"{r.times['ours'][t]:.1f}"}  # fmt: skip
            for form, label in (("fla", "fla naive"), ("recurrent", "recurrent")):
                if form in r.times:
                    row[f"{label} ms"] = f"{r.times[form][t]:.1f}"
                    row[f"{label} / ours"] = _ratio(r.ratios[form][t])
                else:
                    row[f"{label} ms"] = r.skipped.get(form, "–")
                    row[f"{label} / ours"] = "–"
            row["max |diff| vs fla"] = _diff(r, "fla")
            row["max |diff| vs recurrent"] = _diff(r, "recurrent")
            rows.append(row)
    return rows


def memory_rows(results: list[OpsResult]) -> list[dict[str, str]]:
    """One row per mechanism and size: saved MiB and KiB per token of the chunked op and
    the recurrence, and one ``[K, V]`` state of every head in KiB for comparison."""
    rows = []
    for r in results:
        for size in sorted(r.saved.get("ours", {})):
            row = {"mechanism": r.mechanism, "N": str(size)}
            for form, label in (("ours", "chunked"), ("recurrent", "recurrent")):
                saved = r.saved.get(form, {}).get(size)
                row[f"{label} saved MiB"] = "–" if saved is None else f"{saved / 2**20:.1f}"
                row[f"{label} KiB/token"] = "–" if saved is None else f"{saved / size / 1024:.1f}"
            row["one state KiB"] = f"{r.state_bytes / 1024:.0f}"
            rows.append(row)
    return rows


__all__ = [
    "MECHANISMS",
    "OpsResult",
    "PeerUnavailable",
    "chunked",
    "context_state",
    "fla_reference",
    "load_fla_naive",
    "make_inputs",
    "memory_rows",
    "recurrent",
    "run_benchmark",
    "saved_bytes",
    "stream_step",
    "time_rows",
    "time_slice",
]
