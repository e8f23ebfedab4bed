"""Diagnostics types of :func:`~formerlab.linalg.pinv.pinv`: :class:`PinvInfo` (per-matrix
iterations, steps, flags and the certificate, possibly deferred until first read) and
:class:`PinvError` (raised with the diagnostics attached)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from formerlab.linalg.pinv.options import matmuls_per_iteration


class PinvError(RuntimeError):
    """Raised by ``pinv(..., on_fail="raise")``; ``.info`` holds the diagnostics."""

    def __init__(self, message: str, info: PinvInfo) -> None:
        super().__init__(message)
        self.info = info


class PinvInfo:
    """Diagnostics of one ``pinv`` call; tensors have the batch shape of A.

    Attributes:
        iterations: iterations that produced the returned Z (long).
        residual: relative step ‖Z_k − Z_{k−1}‖_F/‖Z_k‖_F into the returned iterate
            (1.0 for Z₀; 0 for a zero matrix).
        penrose: ‖AZA − A‖_F/‖A‖_F of the returned Z.
        converged: the certificate holds and ``bound`` <= tol
            (:mod:`~formerlab.linalg.pinv.certificate`).
        diverged: non-finite values or ‖AZ‖_F > 2√m appeared; Z is the last valid iterate.
        stagnated: stopped because the step stopped falling before convergence.
        fallback: replaced by ``torch.linalg.pinv`` (``on_fail="exact"``).
        bound: certified bound on ‖Z − A⁺_rcond‖_F/‖A⁺_rcond‖_F where reach and gap hold,
            inf elsewhere (:mod:`~formerlab.linalg.pinv.certificate`).
        reach: the reach count K (a huge number where it cannot be certified).
        unrepresentable: the result overflows the output dtype.
        init, order, tol, rcond: the resolved settings.
        extra: ``"diverged_at"``: the iteration at which divergence was detected (-1 if not).

    ``certificate``, instead of penrose, converged, bound and reach: a function returning
    them, run on first access. A fixed iteration count does not need them to decide
    anything, and they cost more than the iterations themselves (~5 of ~10 ms for 4
    landmark matrices of 64 × 64), while a training loop reads them once per log interval.
    """

    def __init__(
        self, iterations: Tensor, residual: Tensor, penrose: Tensor | None,
        converged: Tensor | None, diverged: Tensor, stagnated: Tensor, fallback: Tensor,
        init: str, order: int, tol: float, extra: dict | None = None,
        bound: Tensor | None = None, reach: Tensor | None = None,
        unrepresentable: Tensor | None = None, rcond: float | None = None, *,
        certificate: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
    ) -> None:
        self.iterations, self.residual = iterations, residual
        self.diverged, self.stagnated, self.fallback = diverged, stagnated, fallback
        self.init, self.order, self.tol, self.rcond = init, order, tol, rcond
        self.extra = {} if extra is None else extra
        self.unrepresentable = unrepresentable
        self._certificate = certificate
        self._penrose, self._converged, self._bound, self._reach = penrose, converged, bound, reach

    def _settled(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        if self._certificate is not None:
            with torch.no_grad():
                values = self._certificate()
            self._penrose, self._converged, self._bound, self._reach = values
            self._certificate = None
        return self._penrose, self._converged, self._bound, self._reach

    penrose = property(lambda self: self._settled()[0])
    converged = property(lambda self: self._settled()[1])
    bound = property(lambda self: self._settled()[2])
    reach = property(lambda self: self._settled()[3])

    @property
    def matmuls(self) -> Tensor:
        """Matrix products spent on iterations per matrix."""
        return self.iterations * matmuls_per_iteration(self.order)

    def summary(self) -> dict[str, float]:
        """Scalar summary for logging: mean/max iterations and residuals, fractions."""
        if self.residual.numel() == 0:
            return {}
        res = self.residual.detach().double()
        its = self.iterations.double()
        out = {
            "pinv_iterations": its.mean().item(),
            "pinv_iterations_max": its.max().item(),
            "pinv_residual": res.mean().item(),
            "pinv_residual_max": res.max().item(),
            "pinv_penrose": self.penrose.double().mean().item(),
            "pinv_converged": self.converged.double().mean().item(),
            "pinv_diverged": self.diverged.double().mean().item(),
        }
        if self.bound is not None:
            out["pinv_bound_max"] = self.bound.double().max().item()
        return out

    def reshape(self, shape: tuple[int, ...]) -> PinvInfo:
        """The same diagnostics with the batch dims reshaped to ``shape`` (a pending
        certificate stays pending)."""

        def r(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(shape)

        extra = {k: r(v) if isinstance(v, Tensor) else v for k, v in self.extra.items()}
        if self._certificate is not None:
            certificate, cert = (lambda: tuple(r(t) for t in self._settled())), (None,) * 4
        else:
            certificate, cert = None, tuple(r(t) for t in self._settled())
        penrose, converged, bound, reach = cert
        return PinvInfo(
            r(self.iterations), r(self.residual), penrose, converged, r(self.diverged),
            r(self.stagnated), r(self.fallback), self.init, self.order, self.tol, extra,
            bound, reach, r(self.unrepresentable), self.rcond, certificate=certificate,
        )

    def __getstate__(self) -> dict:
        """Pickling (``torch.save`` of a whole module keeps its last info) settles a
        pending certificate: the function itself is not picklable."""
        self._settled()
        return self.__dict__.copy()

    def __repr__(self) -> str:
        shown = "pending" if self._certificate is not None else f"bound={self._bound}"
        return (
            f"PinvInfo(iterations={self.iterations}, residual={self.residual}, "
            f"diverged={self.diverged}, {shown}, init={self.init!r}, order={self.order}, "
            f"tol={self.tol}, rcond={self.rcond})"
        )
