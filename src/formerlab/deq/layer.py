"""The deep equilibrium layer: output the fixed point z* = f(z*, x) of one function.

Bai, Kolter & Koltun (2019), "Deep Equilibrium Models", NeurIPS. The forward pass finds
z* with a root/fixed-point solver *without* building an autograd graph, then applies f
once more with autograd on (the output is f(z*, x), equal to z* at convergence). Three
ways to get gradients:

* ``"implicit"`` - the implicit function theorem: the gradient arriving at the output,
  g, is replaced by the solution u of the adjoint fixed point u = (df/dz)^T u + g, found
  with vector-Jacobian products only (Bai et al. 2019, eq. 6), and then flows through
  the single graph of f(z*, x) to the parameters and to x. Exact at convergence.
* ``"phantom"`` - k damped steps z <- (1 - tau) z + tau f(z, x) from z*, differentiated
  (Geng et al., 2021, "On Training Implicit Models", NeurIPS): cheaper, approximate.
* ``"unroll"`` - k plain steps z <- f(z, x) from z*, differentiated: truncated
  backpropagation through the last k iterations (the tau = 1 baseline).

In every mode the solver runs outside autograd, so saved tensors and memory do not grow
with the forward iteration count (only with k for phantom/unroll).

Regularisers (training only, collected in ``reg_loss``): the Hutchinson estimate of
||df/dz||_F^2 / d at the fixed point times ``jac_reg`` (Bai, Koltun & Kolter, 2021), and
the fixed-point correction (Bai et al., 2022, "Deep Equilibrium Optical Flow
Estimation", CVPR): ``correction`` intermediate iterates of the solve are each given one
differentiable step of f; the steps are kept in ``corrections`` (so a task loss can be
applied to them) and, with ``correction_weight > 0``, pulled towards the (detached) fixed
point with weights ``correction_decay ** (n - i)``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from formerlab.deq.regularization import jacobian_frobenius
from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.solvers import Solver, SolverInfo
from formerlab.solvers.api import get_solver
from formerlab.solvers.base import STOPS

BACKWARDS = ("implicit", "phantom", "unroll")
ON_NONCONVERGENCE = ("count", "warn", "raise")


class NonConvergenceError(RuntimeError):
    """A DEQ solve did not reach its tolerance and the layer was told to raise; ``info``
    holds the solver's diagnostics (``info.explain()`` says why)."""

    def __init__(self, message: str, info: SolverInfo) -> None:
        super().__init__(message)
        self.info = info


def _check_unit_interval(arg: str, value: Any) -> float:
    value = check_positive_float(arg, value)
    if value > 1:
        raise ValueError(f"{arg}={value!r} is not allowed; expected 0 < {arg} <= 1")
    return value


class DEQ(nn.Module):
    """Fixed point of ``f(z, x, **kwargs)`` in z, with implicit / phantom / unrolled gradients.

    Args:
        f: a module (or callable) mapping ``(z, x, **kwargs)`` to a z-shaped tensor.
        solver: forward solver name (``"anderson"``, ``"broyden"``, ``"fixed_point"``,
            ``"newton_krylov"``, ``"broyden_newton"``; see ``formerlab.solvers``) or a built
            ``Solver``; ``solver_options`` go to it.
        max_iter, tol, stop: forward stopping rule (per sample, see ``formerlab.solvers``).
        backward: ``"implicit"`` | ``"phantom"`` | ``"unroll"``.
        backward_solver, backward_options, backward_max_iter, backward_tol: the adjoint
            solve of ``"implicit"`` (defaults: the forward's solver, options and rule;
            ``backward_options`` alone re-configures the forward's method).
        phantom_steps, phantom_damping: k and tau of ``"phantom"``.
        unroll_steps: k of ``"unroll"``.
        jac_reg, jac_reg_samples: weight and number of Hutchinson probes of the Jacobian
            penalty (0 disables it).
        correction, correction_weight, correction_decay: fixed-point correction (see the
            module docstring); ``correction=0`` disables it.
        on_nonconvergence: ``"count"`` (record only), ``"warn"`` or ``"raise"``
            (``NonConvergenceError``), for the forward and the adjoint solve.

    ``forward(x, z0=None, **kwargs)`` starts from ``z0`` (zeros shaped like x by default)
    and returns f(z*, x) (phantom/unroll: their k differentiated steps). Without autograd
    (``torch.no_grad()``) every mode returns f(z*, x) and builds no graph.
    After a call: ``info`` (forward ``SolverInfo``), ``backward_info`` (after backward),
    ``reg_loss`` (scalar tensor or None), ``corrections`` (list of tensors).
    """

    def __init__(
        self,
        f: nn.Module | Callable[..., Tensor],
        *,
        solver: str | Solver = "anderson",
        solver_options: dict[str, Any] | None = None,
        max_iter: int = 30,
        tol: float = 1e-3,
        stop: str = "rel",
        backward: str = "implicit",
        backward_solver: str | Solver | None = None,
        backward_options: dict[str, Any] | None = None,
        backward_max_iter: int | None = None,
        backward_tol: float | None = None,
        phantom_steps: int = 5,
        phantom_damping: float = 0.5,
        unroll_steps: int = 5,
        jac_reg: float = 0.0,
        jac_reg_samples: int = 1,
        correction: int = 0,
        correction_weight: float = 0.0,
        correction_decay: float = 0.8,
        on_nonconvergence: str = "count",
    ) -> None:
        super().__init__()
        if not callable(f):
            raise ValueError(f"f must be a module or callable (z, x) -> z; got {type(f).__name__}")
        self.f = f
        self.solver = get_solver(solver, dict(solver_options or {}))
        if backward_solver is None:  # solvers keep no state between solves: share it
            backward_solver = self.solver if backward_options is None else self.solver.name
        self.backward_solver = get_solver(backward_solver, dict(backward_options or {}))
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_positive_float("tol", tol, allow_zero=True)
        self.stop = check_choice("stop", stop, STOPS)
        self.backward = check_choice("backward", backward, BACKWARDS)
        self.backward_max_iter = check_positive_int(
            "backward_max_iter", max_iter if backward_max_iter is None else backward_max_iter
        )
        self.backward_tol = check_positive_float(
            "backward_tol", tol if backward_tol is None else backward_tol, allow_zero=True
        )
        self.phantom_steps = check_positive_int("phantom_steps", phantom_steps)
        self.phantom_damping = _check_unit_interval("phantom_damping", phantom_damping)
        self.unroll_steps = check_positive_int("unroll_steps", unroll_steps)
        self.jac_reg = check_positive_float("jac_reg", jac_reg, allow_zero=True)
        self.jac_reg_samples = check_positive_int("jac_reg_samples", jac_reg_samples)
        self.correction = check_positive_int("correction", correction, minimum=0)
        self.correction_weight = check_positive_float("correction_weight", correction_weight, allow_zero=True)
        self.correction_decay = _check_unit_interval("correction_decay", correction_decay)
        self.on_nonconvergence = check_choice("on_nonconvergence", on_nonconvergence, ON_NONCONVERGENCE)

        self.info: SolverInfo | None = None
        self.backward_info: SolverInfo | None = None
        self.reg_loss: Tensor | None = None
        self.jac_loss: Tensor | None = None
        self.corrections: list[Tensor] = []
        self.nonconverged_total = 0  # samples, forward and adjoint, since construction
        self.samples_total = 0

    # -- policy ---------------------------------------------------------------------------
    def _check(self, info: SolverInfo, what: str) -> None:
        bad = int((~info.converged).sum())
        self.nonconverged_total += bad
        self.samples_total += info.batch_size
        if not bad or self.on_nonconvergence == "count":
            return
        message = f"DEQ {what} solve did not converge:\n{info.explain()}"
        if self.on_nonconvergence == "raise":
            raise NonConvergenceError(message, info)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- forward --------------------------------------------------------------------------
    def solve(
        self,
        func: Callable[[Tensor], Tensor],
        z0: Tensor,
        record: list[Tensor] | None = None,
    ) -> tuple[Tensor, SolverInfo]:
        """The forward solve of z = func(z) (no autograd); ``record`` collects the points
        f is evaluated at (for the fixed-point correction)."""
        fn = func
        if record is not None:
            def fn(z: Tensor) -> Tensor:
                record.append(z.detach())
                return func(z)
        return self.solver.solve(
            fn, z0, problem="fixed_point", tol=self.tol, max_iter=self.max_iter, stop=self.stop
        )

    def forward(self, x: Tensor, z0: Tensor | None = None, **kwargs: Any) -> Tensor:
        def func(z: Tensor) -> Tensor:
            return self.f(z, x, **kwargs)

        if z0 is None:
            z0 = torch.zeros_like(x)
        # a plain callable may close over parameters we cannot see: assume it needs grad
        needs_grad = torch.is_grad_enabled() and (
            not isinstance(self.f, nn.Module)
            or x.requires_grad
            or any(p.requires_grad for p in self.f.parameters())
        )
        training = needs_grad and self.training
        self.reg_loss, self.jac_loss, self.corrections = None, None, []
        self.backward_info = None

        record: list[Tensor] | None = [] if (training and self.correction) else None
        with torch.no_grad():
            z_star, info = self.solve(func, z0.detach(), record)
        self.info = info
        self._check(info, "forward")

        z_in = f_star = None
        if self.backward == "implicit" or not needs_grad:
            z_in = z_star.detach().requires_grad_(needs_grad)
            with torch.set_grad_enabled(needs_grad), self._double_backward_ok(training):
                z_out = f_star = func(z_in)
            if needs_grad:
                # the hook sits on a view so that the VJPs it takes through f_star's graph
                # do not fire it again
                z_out = f_star.view_as(f_star)
                z_out.register_hook(self._adjoint_hook(f_star, z_in))
        else:
            steps = self.phantom_steps if self.backward == "phantom" else self.unroll_steps
            tau = self.phantom_damping if self.backward == "phantom" else 1.0
            z_out = z_star.detach()
            for _ in range(steps):
                z_out = (1 - tau) * z_out + tau * func(z_out) if tau < 1 else func(z_out)

        if training:
            self._regularise(func, z_star, z_in, f_star, record)
        return z_out

    def _double_backward_ok(self, training: bool) -> contextlib.AbstractContextManager:
        """The Jacobian penalty differentiates a VJP (double backward), which the fused
        attention kernels lack: use the math backend of scaled_dot_product_attention."""
        if training and self.jac_reg > 0:
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def _adjoint_hook(self, z_out: Tensor, z_in: Tensor) -> Callable[[Tensor], Tensor]:
        """Replace the output gradient g by u solving u = (df/dz)^T u + g."""

        def hook(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # an undefined gradient stays undefined
                return None

            def adjoint(u: Tensor) -> Tensor:
                (vjp,) = torch.autograd.grad(z_out, z_in, u, retain_graph=True)
                return vjp + grad

            u, info = self.backward_solver.solve(
                adjoint,
                grad.detach(),
                problem="fixed_point",
                tol=self.backward_tol,
                max_iter=self.backward_max_iter,
                stop=self.stop,
            )
            self.backward_info = info
            self._check(info, "backward (adjoint)")
            return u

        return hook

    def _regularise(
        self,
        func: Callable[[Tensor], Tensor],
        z_star: Tensor,
        z_in: Tensor | None,
        f_star: Tensor | None,
        record: list[Tensor] | None,
    ) -> None:
        losses: list[Tensor] = []
        if self.jac_reg > 0:
            if z_in is None or f_star is None:  # phantom/unroll: one extra graph of f at z*
                z_in = z_star.detach().requires_grad_()
                with self._double_backward_ok(True):
                    f_out = func(z_in)
            else:
                f_out = f_star
            self.jac_loss = jacobian_frobenius(f_out, z_in, self.jac_reg_samples)
            losses.append(self.jac_reg * self.jac_loss)
        if record:
            # evenly spaced intermediate iterates, excluding the start (z0)
            n = min(self.correction, len(record) - 1)
            picks = torch.linspace(1, len(record) - 1, n).round().long().tolist() if n else []
            target = z_star.detach()
            scale = target.pow(2).mean().clamp_min(1e-12)
            total = None
            for i, idx in enumerate(picks):
                step = func(record[idx].to(z_star.dtype))
                self.corrections.append(step)
                if self.correction_weight > 0:
                    term = (step - target).pow(2).mean() / scale
                    term = term * self.correction_decay ** (len(picks) - 1 - i)
                    total = term if total is None else total + term
            if total is not None:
                losses.append(self.correction_weight * total)
        if losses:
            self.reg_loss = torch.stack([t.float() for t in losses]).sum()

    # -- metrics --------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Statistics of the last call (forward solve, adjoint solve, regularisers)."""
        out: dict[str, float] = {}
        if self.info is not None:
            s = self.info.summary()
            out.update(
                deq_iterations=s["iterations"],
                deq_residual=s["residual"],
                deq_max_residual=s["max_residual"],
                deq_nonconverged=s["nonconverged"],
            )
        if self.backward_info is not None:
            s = self.backward_info.summary()
            out.update(
                deq_backward_iterations=s["iterations"],
                deq_backward_residual=s["residual"],
                deq_backward_nonconverged=s["nonconverged"],
            )
        if self.jac_loss is not None:
            out["deq_jac_loss"] = float(self.jac_loss.detach())
        if self.samples_total:
            out["deq_nonconverged_total"] = float(self.nonconverged_total)
        return out

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver.name}, max_iter={self.max_iter}, tol={self.tol:g}, "
            f"stop={self.stop}, backward={self.backward}"
        )
