"""Convergence study of the iterative pseudoinverse (``formerlab pinv-study``).

For each matrix size, a batch of test matrices is inverted with every initial scale
(``global``, ``razavi``, ``frobenius``, ``spectral``, ``auto``) and iteration order
(2, 3, 7). Per case it reports

* the outcome for the batch: "converged in K iterations / M matmuls" (K, M the largest
  over the batch; converged = the certified bound of :func:`formerlab.linalg.pinv` is
  below tol), "stagnated", "stopped at max_iter" or "diverged at K (non-finite)";
* the relative error ‖Z − A⁺‖_F/‖A⁺‖_F of the result (worst matrix; A⁺ from
  ``torch.linalg.pinv`` in float64 with the same cut-off ``rcond``) and the worst
  certified bound;
* the same error after the paper's fixed 6 iterations;
* ``bound/error``: the largest ratio of certified bound to error over the batch (how sharp
  the certificate is; >= 1 always).

:func:`bound_ratios` (``python -m formerlab.bench.pinv_study``) measures that ratio by
condition number: square matrices with prescribed singular values (log-spaced from 1 to
1/cond, one small value, or half of them small) and Haar-random singular vectors, iterated
to the limit of the dtype; it prints min / median / max of bound/error per condition number.

Test matrices (``kind``): ``"random"`` — ``torch.rand`` matrices multiplied by scales
spread over 10⁻³ … 10³ within the batch (a batch mixing scales is where one global
initial scale fails: the small matrices start far too small); ``"softmax"`` — row-softmax
matrices softmax(q kᵀ/√64) of Gaussian q, k with std spread over 0.5 … 2 (flat to sharp
rows; these are Nyström's landmark matrices and often badly conditioned).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.linalg.pinv import INITS, matmuls_per_iteration, pinv

KINDS = ("random", "softmax")
DEFAULT_SIZES = (2, 3, 8, 17, 32, 64, 100, 128, 256, 512)
DEFAULT_ORDERS = (2, 3, 7)
STUDY_INITS = ("global", "razavi", "frobenius", "spectral", "auto")


@dataclass
class StudyRow:
    """One (size, init, order) case of the study."""

    size: int
    init: str
    order: int
    outcome: str
    iterations: int
    matmuls: int
    converged: int
    total: int
    error: float
    error_at_6: float
    cond_max: float
    bound: float = math.inf
    ratio: float = math.nan  # largest bound/error over the batch (finite bounds)


def study_matrices(kind: str, size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """A float64 (batch, size, size) batch of the study's test matrices (module docs)."""
    check_choice("kind", kind, KINDS)
    gen = torch.Generator().manual_seed(seed + size)
    if kind == "random":
        scales = torch.logspace(-3, 3, batch, dtype=torch.float64)
        return torch.rand(batch, size, size, generator=gen, dtype=torch.float64) * scales[:, None, None]
    std = torch.linspace(0.5, 2.0, batch, dtype=torch.float64)[:, None, None]
    q = torch.randn(batch, size, 64, generator=gen, dtype=torch.float64) * std
    k = torch.randn(batch, size, 64, generator=gen, dtype=torch.float64) * std
    return (q @ k.mT / 8.0).softmax(dim=-1)


def _rel_errors(Z: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    diff = (Z.double() - ref).flatten(-2).norm(dim=-1)
    den = ref.flatten(-2).norm(dim=-1).clamp(min=1e-300)
    err = diff / den
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))


def study_case(
    A: torch.Tensor, init: str, order: int, tol: float | None, max_iter: int,
    dtype: torch.dtype,
) -> tuple[str, int, int, int, float, float, float, float]:
    """(outcome, iterations, matmuls, converged count, worst error, worst error after 6,
    worst bound, largest bound/error); errors against float64 ``torch.linalg.pinv`` of the matrices as cast
    to ``dtype``, with the cut-off the iteration used."""
    a = A.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the global init warns; the table says it all
        Z, info = pinv(a, init=init, order=order, tol=tol, max_iter=max_iter, on_fail="warn",
                       return_info=True)
        Z6 = pinv(a, init=init, order=order, iters=6, on_fail="warn")
    ref = torch.linalg.pinv(a.double(), rtol=info.rcond)
    its = int(info.iterations.max())
    mm = its * matmuls_per_iteration(order)
    conv = int(info.converged.sum())
    total = info.converged.numel()
    if bool(info.diverged.any()):
        k = int(info.extra["diverged_at"][info.diverged].min())
        outcome = f"{int(info.diverged.sum())}/{total} diverged at {k}"
    elif conv == total:
        outcome = f"converged in {its} / {mm} matmuls"
    elif bool(info.stagnated.any()):
        outcome = f"{conv}/{total} converged, rest stagnated (res {info.residual.max():.1e})"
    else:
        outcome = f"{conv}/{total} converged by max_iter={max_iter}"
    errors = _rel_errors(Z, ref)
    return (outcome, its, mm, conv, errors.max().item(), _rel_errors(Z6, ref).max().item(),
            info.bound.max().item(), _largest_ratio(info.bound, errors))


def _largest_ratio(bound: torch.Tensor, errors: torch.Tensor) -> float:
    """max bound/error over the matrices with a finite bound (nan if none has one)."""
    finite = torch.isfinite(bound)
    if not bool(finite.any()):
        return math.nan
    ratio = bound[finite] / errors[finite].clamp(min=1e-300)
    return ratio.max().item()


def run_pinv_study(
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    kind: str = "random",
    tol: float | None = None,
    max_iter: int = 100,
    inits: tuple[str, ...] = STUDY_INITS,
    orders: tuple[int, ...] = DEFAULT_ORDERS,
    batch: int = 8,
    dtype: str = "float64",
    seed: int = 0,
    progress=None,
) -> list[StudyRow]:
    """Run the study. With ``progress`` given, ``progress(message)`` is called before each
    size and a rich progress bar (on stderr) counts the cases."""
    check_choice("kind", kind, KINDS)
    check_choice("dtype", dtype, ("float32", "float64"))
    check_positive_int("max_iter", max_iter)
    check_positive_int("batch", batch)
    if tol is not None:
        check_positive_float("tol", tol)
    for s in sizes:
        check_positive_int("sizes", s)
    for i in inits:
        check_choice("inits", i, INITS)
    for o in orders:
        check_positive_int("orders", o, minimum=2)
    torch_dtype = getattr(torch, dtype)
    rows: list[StudyRow] = []
    total = len(sizes) * len(inits) * len(orders)
    with _progress_bar() if progress is not None else nullcontext() as bar:
        task = bar.add_task("pinv-study", total=total) if bar is not None else None
        for size in sizes:
            if progress is not None:
                progress(f"size {size}")
            A = study_matrices(kind, size, batch, seed)
            cond = torch.linalg.cond(A).max().item()
            for init in inits:
                for order in orders:
                    if bar is not None:
                        bar.update(task, description=f"N={size} {init} order {order}")
                    outcome, its, mm, conv, err, err6, bound, ratio = study_case(
                        A, init, order, tol, max_iter, torch_dtype
                    )
                    rows.append(StudyRow(size, init, order, outcome, its, mm, conv, batch, err,
                                         err6, cond, bound, ratio))
                    if bar is not None:
                        bar.advance(task)
    return rows


def _progress_bar() -> Progress:
    """A transient per-case progress bar on stderr (stdout stays clean for tables)."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=Console(stderr=True), transient=True,
    )


def auto_evidence(rows: list[StudyRow]) -> dict[str, tuple[int, int, float]]:
    """Per init: (total matmuls over all cases, cases fully converged, worst error)."""
    out: dict[str, tuple[int, int, float]] = {}
    for init in {r.init for r in rows}:
        mine = [r for r in rows if r.init == init]
        out[init] = (
            sum(r.matmuls for r in mine),
            sum(r.converged == r.total for r in mine),
            max(r.error for r in mine),
        )
    return out


def table(rows: list[StudyRow]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the study, for rich or markdown output."""
    cols = ["N", "init", "order", "outcome (iterations / matmuls)", "error", "bound",
            "bound/error", "error after 6", "max cond"]
    out = []
    for r in rows:
        out.append([
            str(r.size), r.init, str(r.order), r.outcome, f"{r.error:.1e}", f"{r.bound:.1e}",
            f"{r.ratio:.3g}", f"{r.error_at_6:.2g}", f"{r.cond_max:.1e}",
        ])
    return cols, out


# --------------------------------------------------------------------------- bound / error

RATIO_SPECTRA = ("logspaced", "one-small", "two-level")


@dataclass
class RatioRow:
    """bound/error of the certificate at one condition number (all spectra, seeds)."""

    cond: float
    dtype: str
    size: int
    cases: int
    ratio_min: float
    ratio_median: float
    ratio_max: float
    error_median: float
    bound_median: float


def ratio_matrices(spectrum: str, size: int, cond: float, count: int, seed: int = 0) -> torch.Tensor:
    """(count, size, size) float64 U·diag(s)·Vᵀ, U, V Haar-random, s of ``spectrum``:
    ``"logspaced"`` 1 … 1/cond, ``"one-small"`` all 1 but the last 1/cond, ``"two-level"``
    half 1, half 1/cond."""
    check_choice("spectrum", spectrum, RATIO_SPECTRA)
    gen = torch.Generator().manual_seed(seed)
    s = torch.ones(size, dtype=torch.float64)
    if spectrum == "logspaced":
        s = torch.logspace(0, -math.log10(cond), size, dtype=torch.float64)
    elif spectrum == "one-small":
        s[-1] = 1 / cond
    else:
        s[size // 2:] = 1 / cond

    def haar() -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(count, size, size, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]

    return (haar() * s) @ haar().mT


def bound_ratios(
    conds: tuple[float, ...] = (1.0, 1e2, 1e4, 1e6, 1e8),
    dtype: str = "float64",
    size: int = 64,
    count: int = 4,
    seed: int = 0,
) -> list[RatioRow]:
    """Certified bound / true error by condition number: per cond, ``count`` matrices of
    each :data:`RATIO_SPECTRA`, iterated to the limit of the dtype (tol 1e-16 / 1e-9: each
    returns its best certified iterate and bound), true error against float64
    ``torch.linalg.pinv`` of the matrix as cast, with the same cut-off."""
    check_choice("dtype", dtype, ("float32", "float64"))
    check_positive_int("size", size)
    check_positive_int("count", count)
    torch_dtype = getattr(torch, dtype)
    tol = 1e-16 if dtype == "float64" else 1e-9
    rows = []
    for cond in conds:
        check_positive_float("conds", cond)
        ratios, errors, bounds = [], [], []
        for spectrum in RATIO_SPECTRA:
            A = ratio_matrices(spectrum, size, cond, count, seed).to(torch_dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tol is below reach on purpose
                Z, info = pinv(A, tol=tol, max_iter=300, on_fail="warn", return_info=True)
            err = _rel_errors(Z, torch.linalg.pinv(A.double(), rtol=info.rcond))
            ratios.append(info.bound / err.clamp(min=1e-300))
            errors.append(err)
            bounds.append(info.bound)
        r, e, b = torch.cat(ratios), torch.cat(errors), torch.cat(bounds)
        rows.append(RatioRow(cond, dtype, size, r.numel(), r.min().item(), r.median().item(),
                             r.max().item(), e.median().item(), b.median().item()))
    return rows


def ratio_markdown(rows: list[RatioRow]) -> str:
    """The bound/error rows as a markdown table."""
    out = ["| dtype | n | cond | cases | bound/error min | median | max | error (median) | "
           "bound (median) |", "|" + "---|" * 9]
    for r in rows:
        out.append(f"| {r.dtype} | {r.size} | {r.cond:.0e} | {r.cases} | {r.ratio_min:.3g} | "
                   f"{r.ratio_median:.3g} | {r.ratio_max:.3g} | {r.error_median:.1e} | "
                   f"{r.bound_median:.1e} |")
    return "\n".join(out)


def markdown(rows: list[StudyRow]) -> str:
    """The study as a markdown table plus the per-init totals (the ``auto`` evidence)."""
    cols, body = table(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    out.append("")
    for init, (mm, ok, err) in sorted(auto_evidence(rows).items()):
        out.append(f"{init}: {mm} matmuls in total, {ok} cases fully converged, worst error {err:.1e}")
    return "\n".join(out)


def all_ratios(size: int, seed: int = 0) -> list[RatioRow]:
    """``bound_ratios`` at ``size`` over float64 condition 1…1e8 and float32 1…1e4."""
    return bound_ratios(dtype="float64", size=size, seed=seed) + bound_ratios(
        (1.0, 1e1, 1e2, 1e3, 1e4), dtype="float32", size=size, seed=seed
    )


if __name__ == "__main__":  # python -m formerlab.bench.pinv_study [size ...]
    import sys

    for n in [int(a) for a in sys.argv[1:]] or [64]:
        print(ratio_markdown(all_ratios(n)))
