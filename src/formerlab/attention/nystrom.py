"""Nyström attention (Xiong et al., "Nyströmformer", AAAI 2021) done carefully.

softmax(QKᵀ/√d)·V ≈ F · W⁺ · (R·V) with the landmark factors of
:mod:`formerlab.attention.landmark` and W⁺ from :func:`formerlab.linalg.pinv` (or a
regularised inverse), evaluated right to left in O(N·m·d).

What this implementation guarantees (tests in tests/attention/test_nystrom*.py):

* landmarks are means of segments of the **real** tokens: any N, no zero-padding bias,
  outputs at real positions independent of padding;
* a sequence with at most m real tokens gets exact softmax attention (every token is
  its own landmark, out = F·V);
* the pseudoinverse's initial scale is per matrix, its diagnostics (iterations, residual,
  converged) are kept in ``last_info`` and ``diagnostics()``, and failures follow
  ``pinv_on_fail``;
* all factors are computed in float32 (float64 for float64 input): bf16/fp16 inputs and
  logits up to |q·k|/√d = 100 give finite outputs;
* ``pinv_select="rows"`` picks the iteration count (or λ / rcond of a regularised
  inverse) per head and call by the error on a few exactly computed rows — the exact
  pseudoinverse of an ill-conditioned W amplifies the landmark error (semi-convergence,
  see ``formerlab approx`` and the README);
* optional depthwise convolution skip on V (as in the paper's code), padding-aware;
* unpadded calls run the same computation as one autograd function with a hand-written
  backward (:mod:`formerlab.attention.nystrom_product`), tested against this general path.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from formerlab.attention.base import AttentionKernel, check_kernel_options
from formerlab.attention.conv_skip import DepthwiseConvSkip, depthwise_conv_seq
from formerlab.attention.landmark import LandmarkFactors, landmark_factors
from formerlab.attention.nystrom_product import nystrom_product
from formerlab.attention.nystrom_projected import nystrom_projected
from formerlab.attention.registry import register
from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.linalg.numerics import compute_dtype, relative_step
from formerlab.linalg.pinv import (
    AUTO_INIT,
    BACKWARDS,
    INITS,
    ON_FAIL,
    PinvInfo,
    binary_exponent,
    certify,
    check_rcond,
    default_rcond,
    default_tol,
    penrose_residual,
    pinv,
    pinv_iterates,
    pinv_reg,
    reach_and_upper_norm,
    scale_pow2,
)

REGULARISERS = (None, "tikhonov", "tsvd", "exact")
SELECTORS = (None, "rows")
DEFAULT_REG_PARAM = {"tikhonov": 1e-3, "tsvd": 1e-3}
# λ (tikhonov) / rcond (tsvd) candidates of sampled-row validation
REG_GRID = tuple(10.0 ** (-e / 2) for e in range(14, -1, -1))  # 1e-7 … 1
SELECT_PATIENCE = 4
# keep the earliest iterate within this fraction of the lowest sampled-row error; 0 = the
# minimum (measured on 8 data sets: slacks of 0.1 and 0.25 did not help on average)
SELECT_SLACK = 0.0


@dataclass
class NystromInfo:
    """Diagnostics of the last call: the pseudoinverse's and the validation's.

    ``pinv`` has batch shape (B, H) (None for the regularised direct inverses); ``selected``
    (B, H) the iteration count or λ/rcond chosen by sampled-row validation, ``val_error``
    (B, H) the relative error on the sampled rows of the kept inverse.
    """

    pinv: PinvInfo | None = None
    selected: Tensor | None = None
    val_error: Tensor | None = None
    exact_sequences: int = 0
    extra: dict = field(default_factory=dict)


def sample_rows(attention_mask: Tensor | None, b: int, n: int, s: int, device) -> Tensor:
    """(B, s) indices of random real query positions (with replacement)."""
    weights = torch.ones(b, n, device=device) if attention_mask is None else attention_mask.float()
    weights = weights + (weights.sum(-1, keepdim=True) == 0).float()  # all-padded rows
    return torch.multinomial(weights, s, replacement=True)


def exact_rows(fac: LandmarkFactors, idx: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Exact softmax attention outputs at query rows ``idx`` (B, s): (B, H, s, D), O(s·N·D)."""
    h, d = fac.q.shape[1], fac.q.shape[-1]
    gather = idx[:, None, :, None].expand(-1, h, -1, d)
    qs = fac.q.gather(2, gather)
    scores = qs @ fac.k.mT
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ fac.v


def _rel_err(approx: Tensor, ref: Tensor) -> Tensor:
    """Relative Frobenius error per (B, H) over the last two dims; inf if non-finite."""
    err = (approx - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1).clamp(min=1e-30)
    return torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))


@register(
    "nystrom",
    causal=False,
    complexity="O(N·m·D + m³·iters) time, O(N·m) memory",
    description="Nyström attention F·W⁺·R·V (Nyströmformer) with a diagnosed iterative pinv",
)
class NystromAttention(AttentionKernel):
    """Nyström approximation F·W⁺·R·V of softmax attention (non-causal).

    Args:
        num_landmarks: m, the number of segment-mean landmarks.
        pinv_iters: fixed iteration count of the pseudoinverse (the paper uses 6); None
            iterates to ``pinv_tol``.
        pinv_tol: tolerance on the relative step of the iteration (see
            :func:`formerlab.linalg.pinv`); with ``pinv_iters`` set it only stops early.
        pinv_max_iter: cap when iterating to tolerance or selecting by validation.
        pinv_init, pinv_order, pinv_backward, pinv_on_fail, pinv_rcond: passed to ``pinv``
            (``pinv_on_fail="warn"`` here: failures are warned about once per kernel and
            always visible in ``last_info`` / ``diagnostics()``). ``pinv_backward="implicit"``
            (the derivative of A⁺ at the result) needs ``pinv_iters=None``: with a fixed
            count the result is a truncated iterate and only ``"unroll"`` differentiates it
            exactly; with ``pinv_select`` or ``pinv_reg`` it raises too.
        pinv_reg: None (iterative pinv), ``"tikhonov"``, ``"tsvd"`` (regularised direct
            inverses, :func:`formerlab.linalg.pinv.pinv_reg`) or ``"exact"``
            (``torch.linalg.pinv`` in float64; for studies).
        pinv_reg_param: λ for tikhonov / rcond for tsvd (defaults in ``DEFAULT_REG_PARAM``).
        pinv_select: None, or ``"rows"``: choose the iteration count (iterative: among
            1 … ``pinv_max_iter``, stopping 4 iterations past every head's minimum;
            ``pinv_iters`` is then unused) or λ / rcond (regularised, from ``REG_GRID``)
            per head by the error on ``select_rows`` exactly computed rows; gradients are
            unrolled through the chosen iterate.
        select_rows: s, rows sampled per sequence for validation (cost O(s·N·d)).
        conv_kernel: odd kernel size of the depthwise convolution skip on V, or None.
        conv_heads: heads of the convolution (one filter each); None shares one filter.
        scale: logit scale (default 1/√D).

    Options that another option makes meaningless raise a ``ValueError`` when set to
    anything but their default (e.g. ``pinv_tol`` with ``pinv_reg="tikhonov"``,
    ``pinv_max_iter`` with a fixed ``pinv_iters``, ``select_rows`` without ``pinv_select``).
    """

    name = "nystrom"
    supports_causal = False
    packed_modes = ("bidirectional",)  # landmarks over each row's real tokens

    def __init__(
        self,
        num_landmarks: int = 64,
        pinv_iters: int | None = 6,
        pinv_tol: float | None = None,
        pinv_max_iter: int = 100,
        pinv_init: str = "auto",
        pinv_order: int = 3,
        pinv_reg: str | None = None,
        pinv_reg_param: float | None = None,
        pinv_backward: str = "unroll",
        pinv_on_fail: str = "warn",
        pinv_rcond: float | None = None,
        pinv_select: str | None = None,
        select_rows: int = 64,
        conv_kernel: int | None = None,
        conv_heads: int | None = None,
        scale: float | None = None,
    ) -> None:
        check_kernel_options(
            "nystrom", nullable=("pinv_iters", "pinv_tol", "pinv_reg_param", "conv_kernel",
                                 "conv_heads", "scale"),
            num_landmarks=num_landmarks, pinv_iters=pinv_iters, pinv_tol=pinv_tol,
            pinv_max_iter=pinv_max_iter, pinv_order=pinv_order, pinv_reg_param=pinv_reg_param,
            select_rows=select_rows, conv_kernel=conv_kernel, conv_heads=conv_heads, scale=scale,
        )
        super().__init__()
        self.num_landmarks = check_positive_int("num_landmarks", num_landmarks)
        if pinv_iters is not None:
            check_positive_int("pinv_iters", pinv_iters, minimum=0)
        self.pinv_iters = pinv_iters
        self.pinv_tol = None if pinv_tol is None else check_positive_float("pinv_tol", pinv_tol)
        self.pinv_max_iter = check_positive_int("pinv_max_iter", pinv_max_iter)
        self.pinv_init = check_choice("pinv_init", pinv_init, INITS)
        self.pinv_order = check_positive_int("pinv_order", pinv_order, minimum=2)
        self.pinv_reg = check_choice("pinv_reg", pinv_reg, REGULARISERS)
        if pinv_reg_param is not None:
            check_positive_float("pinv_reg_param", pinv_reg_param)
            if pinv_reg not in ("tikhonov", "tsvd"):
                raise ValueError(
                    f"pinv_reg_param={pinv_reg_param!r} needs pinv_reg='tikhonov' or 'tsvd'; "
                    f"got pinv_reg={pinv_reg!r}"
                )
        self.pinv_reg_param = pinv_reg_param
        self.pinv_backward = check_choice("pinv_backward", pinv_backward, BACKWARDS)
        self.pinv_on_fail = check_choice("pinv_on_fail", pinv_on_fail, ON_FAIL)
        self.pinv_select = check_choice("pinv_select", pinv_select, SELECTORS)
        if pinv_select is not None and pinv_reg == "exact":
            raise ValueError("pinv_select='rows' has nothing to choose with pinv_reg='exact'")
        self.select_rows = check_positive_int("select_rows", select_rows)
        if conv_heads is not None and conv_kernel is None:
            raise ValueError(f"conv_heads={conv_heads!r} needs conv_kernel (got None)")
        self.conv = None if conv_kernel is None else DepthwiseConvSkip(conv_kernel, conv_heads)
        self.scale = None if scale is None else check_positive_float("scale", scale)
        self.pinv_rcond = None if pinv_rcond is None else check_rcond(pinv_rcond)
        self._check_combinations(
            pinv_iters=pinv_iters, pinv_tol=pinv_tol, pinv_max_iter=pinv_max_iter,
            pinv_init=pinv_init, pinv_order=pinv_order, pinv_backward=pinv_backward,
            pinv_on_fail=pinv_on_fail, pinv_rcond=pinv_rcond, select_rows=select_rows,
        )
        self._warned = False

    def _check_combinations(self, **given) -> None:
        """Raise for options that another option makes meaningless (set to a non-default)."""
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        reg, select = self.pinv_reg, self.pinv_select
        if reg is not None:
            unused = ["pinv_iters", "pinv_tol", "pinv_max_iter", "pinv_init", "pinv_order",
                      "pinv_backward", "pinv_on_fail", "pinv_rcond"]
            why = f"pinv_reg={reg!r} (a direct inverse, no iteration)"
        elif select is not None:
            unused = ["pinv_iters", "pinv_tol", "pinv_on_fail", "pinv_rcond"]
            why = f"pinv_select={select!r} (the count is chosen on sampled rows)"
        elif given["pinv_iters"] is not None:
            unused = ["pinv_max_iter"]
            why = f"pinv_iters={given['pinv_iters']} (a fixed iteration count)"
        else:
            unused = []
            why = ""
        if select is None:
            unused.append("select_rows")
            why_rows = "pinv_select=None"
        for name in unused:
            if given[name] != defaults[name]:
                reason = why_rows if name == "select_rows" else why
                raise ValueError(
                    f"{name}={given[name]!r} has no effect with {reason}; leave it at its "
                    f"default ({defaults[name]!r})"
                )
        if given["pinv_backward"] == "implicit" and (given["pinv_iters"] is not None or select):
            what = f"pinv_iters={given['pinv_iters']}" if select is None else f"pinv_select={select!r}"
            raise ValueError(
                f"pinv_backward='implicit' is not allowed with {what}: the result is a truncated "
                "iterate, and the implicit derivative is that of the exact A⁺ (wrong for it); "
                "use pinv_backward='unroll' (exact for the iterate) or pinv_iters=None"
            )

    # ------------------------------------------------------------------ inverses

    def _pinv(self, W: Tensor) -> tuple[Tensor, PinvInfo]:
        if torch.compiler.is_compiling():  # dynamo cannot trace catch_warnings
            return pinv(
                W, order=self.pinv_order, init=self.pinv_init, iters=self.pinv_iters,
                tol=self.pinv_tol, max_iter=self.pinv_max_iter, backward=self.pinv_backward,
                on_fail=self.pinv_on_fail, return_info=True,
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Z, info = pinv(
                W, order=self.pinv_order, init=self.pinv_init, iters=self.pinv_iters,
                tol=self.pinv_tol, rcond=self.pinv_rcond, max_iter=self.pinv_max_iter,
                backward=self.pinv_backward, on_fail=self.pinv_on_fail, return_info=True,
            )
        if caught and not self._warned:
            # once per kernel, not once per training step (catch_warnings resets Python's
            # own once-per-place bookkeeping); the numbers are in last_info / diagnostics()
            self._warned = True
            for w in caught:
                message = str(w.message)
                if "failed" in message:
                    message = (
                        "nystrom: the landmark pseudoinverse did not converge for some heads "
                        f"({message.split('; their residuals')[0].removeprefix('pinv: ')}); "
                        "see kernel.last_info.pinv or diagnostics(); this is reported once "
                        "per kernel. pinv_on_fail='exact' or 'raise' changes the handling"
                    )
                warnings.warn(message, w.category, stacklevel=4)
        return Z, info

    def _select_iterations(
        self, W: Tensor, F_s: Tensor, RV: Tensor, target: Tensor
    ) -> tuple[Tensor, NystromInfo]:
        """Per head, the iterate with the lowest error on the sampled rows (the earliest
        within ``SELECT_SLACK`` of it)."""
        iterates = pinv_iterates(W, order=self.pinv_order, init=self.pinv_init)
        prev = next(iterates)
        Zs, errs, steps = [], [], []
        best_err = torch.full(W.shape[:-2], float("inf"), device=W.device, dtype=W.dtype)
        since = torch.zeros(W.shape[:-2], dtype=torch.long, device=W.device)
        for _ in range(self.pinv_max_iter):
            Z = next(iterates)
            with torch.no_grad():
                err = _rel_err(F_s @ (Z @ RV), target)
                step = relative_step(Z, prev)
            Zs.append(Z)
            errs.append(err)
            steps.append(step)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            since = torch.where(better, 0, since + 1)
            prev = Z
            if bool((since >= SELECT_PATIENCE).all()):
                break  # past every head's minimum (the error curve is unimodal in practice)
        err_k = torch.stack(errs, dim=-1)  # (..., K)
        ok = err_k <= (1 + SELECT_SLACK) * best_err[..., None]
        chosen = ok.long().argmax(dim=-1)  # first index within the slack
        Z = torch.stack(Zs, dim=-3)  # (..., K, m, m)
        idx = chosen[..., None, None, None].expand(*chosen.shape, 1, *Z.shape[-2:])
        best_Z = Z.gather(-3, idx).squeeze(-3)
        val = err_k.gather(-1, chosen[..., None]).squeeze(-1)
        res = torch.stack(steps, dim=-1).gather(-1, chosen[..., None]).squeeze(-1)
        k = chosen + 1
        bound, reach, rcond = self._certify_iterate(W, best_Z, k)
        tol = default_tol(W.dtype)
        false = torch.zeros_like(k, dtype=torch.bool)
        info = PinvInfo(
            k, res, penrose_residual(W.detach(), best_Z.detach()), bound <= tol, false, false,
            false, AUTO_INIT if self.pinv_init == "auto" else self.pinv_init, self.pinv_order,
            tol, bound=bound, reach=reach, rcond=rcond,
        )
        return best_Z, NystromInfo(pinv=info, selected=k.float(), val_error=val)

    def _certify_iterate(self, W: Tensor, Z: Tensor, k: Tensor) -> tuple[Tensor, Tensor, float]:
        """The pinv certificate (bound, reach) of iterate k of W, as ``pinv`` reports it."""
        init = AUTO_INIT if self.pinv_init == "auto" else self.pinv_init
        m = W.shape[-1]
        rcond = default_rcond(W.dtype, m, m)
        with torch.no_grad():
            a = W.detach().reshape(-1, m, m)
            e = binary_exponent(a)
            a = scale_pow2(a, -e)
            z = scale_pow2(Z.detach().reshape(-1, m, m), e)
            reach, sigma_hi = reach_and_upper_norm(a, init, rcond, self.pinv_order, int(k.max()))
            bound = certify(a, z, k.reshape(-1), reach, sigma_hi, rcond)
        return bound.reshape(k.shape), reach.reshape(k.shape), rcond

    def _select_regularised(
        self, W: Tensor, F_s: Tensor, RV: Tensor, target: Tensor
    ) -> tuple[Tensor, NystromInfo]:
        """Choose λ (tikhonov) or rcond (tsvd) per head from ``REG_GRID`` on sampled rows."""
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(W.detach())
            grid = torch.tensor(REG_GRID, dtype=W.dtype, device=W.device)
            smax = S[..., :1]
            if self.pinv_reg == "tikhonov":  # σ/(σ² + λσ_max²)
                filt = S[..., None, :] / (S[..., None, :] ** 2 + grid[:, None] * smax[..., None, :] ** 2)
            else:  # 1/σ above rcond·σ_max, else 0
                keep = S[..., None, :] > grid[:, None] * smax[..., None, :]
                filt = torch.where(keep, 1.0 / S[..., None, :].clamp(min=1e-30), torch.zeros_like(keep, dtype=W.dtype))
            left = (F_s @ Vh.mT)[..., None, :, :] * filt[..., None, :]  # (B,H,G,s,m)
            out = left @ (U.mT @ RV)[..., None, :, :]
            err = _rel_err(out, target[..., None, :, :])  # (B,H,G)
            best_err, best = err.min(dim=-1)
            chosen = grid[best]
        Z = pinv_reg(W, method=self.pinv_reg, lam=chosen, rcond=chosen)
        return Z, NystromInfo(selected=chosen, val_error=best_err)

    def _inverse(
        self, fac: LandmarkFactors, W: Tensor, RV: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, NystromInfo]:
        if self.pinv_select == "rows":
            b, _, n, _ = fac.q.shape
            idx = sample_rows(attention_mask, b, n, self.select_rows, W.device)
            with torch.no_grad():
                target = exact_rows(fac, idx, attention_mask)
            F_s = fac.F.gather(2, idx[:, None, :, None].expand(-1, fac.F.shape[1], -1, fac.F.shape[-1]))
            if self.pinv_reg is None:
                return self._select_iterations(W, F_s.detach(), RV.detach(), target)
            return self._select_regularised(W, F_s.detach(), RV.detach(), target)
        return self._direct_inverse(W)

    def _direct_inverse(self, W: Tensor) -> tuple[Tensor, NystromInfo]:
        """The iterative pinv or the regularised inverse of W (no sampled-row selection)."""
        if self.pinv_reg is None:
            Z, info = self._pinv(W)
            return Z, NystromInfo(pinv=info)
        if self.pinv_reg == "exact":
            return torch.linalg.pinv(W.double()).to(W.dtype), NystromInfo()
        param = self.pinv_reg_param or DEFAULT_REG_PARAM[self.pinv_reg]
        return pinv_reg(W, method=self.pinv_reg, lam=param, rcond=param), NystromInfo()

    # ------------------------------------------------------------------ forward

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        b, h, n, _ = q.shape
        m = self.num_landmarks
        fusable = attention_mask is None and n > m and not need_weights
        # (torch.compile traces the plain ops below and fuses them itself)
        if fusable and self.pinv_select is None and not torch.compiler.is_compiling():
            return self._attend_unmasked(q, k, v), None
        fac = landmark_factors(q, k, v, attention_mask, m, self.scale)
        # sequences with <= m real tokens: every token is its own landmark -> exact
        exact = fac.layout.exact if (n <= m or attention_mask is not None) else None
        any_exact = exact is not None and bool(exact.any())
        W = fac.W()
        if any_exact:  # their W is not used; an identity keeps the iteration trivial
            eye = torch.eye(m, dtype=W.dtype, device=W.device)
            W = torch.where(exact[:, None, None, None], eye, W)
        RV = fac.R @ fac.v
        Z, info = self._inverse(fac, W, RV, attention_mask)
        info.exact_sequences = int(exact.sum()) if any_exact else 0
        self.last_info = info
        out = fac.F @ (Z @ RV)
        weights = None
        if need_weights:
            weights = fac.F @ Z @ fac.R
        if any_exact:
            assign = fac.assignment()  # (B, 1, m, N): landmarks = assign · x
            sel = exact[:, None, None, None]
            out = torch.where(sel, fac.F @ (assign @ fac.v), out)
            if need_weights:
                weights = torch.where(sel, fac.F @ assign, weights)
        if self.conv is not None:
            out = out + self.conv(fac.v, attention_mask)
        return out, (weights.to(q.dtype) if weights is not None else None)

    def _attend_unmasked(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The common case (no padding, N > m, no weights, no selection) in fewer passes:
        the same landmarks and inverse as :meth:`attend`, fused into one autograd function
        (:func:`~formerlab.attention.nystrom_product.nystrom_product`)."""
        work = compute_dtype(q.dtype)
        inverse, infos = self._recorded_inverse()
        conv_weight = None if self.conv is None else self.conv.head_weights(q.shape[1], work)
        out = nystrom_product(
            q.to(work), k.to(work), v.to(work), self.num_landmarks, inverse,
            self._logit_scale(q.shape[-1]), conv_weight,
        )
        self.last_info = infos[0]
        return out

    def fuses_projection(self, x: Tensor, weight: Tensor, heads: int) -> bool:
        """True for the calls of :meth:`_attend_unmasked` (no selection, N > m) whose input
        is already the compute dtype (float32 or float64, no autocast) and whose
        landmarks are at most the head size (m ≤ D: then the fused GEMM is no larger
        than the qkv projection, see :mod:`~formerlab.attention.nystrom_projected`)."""
        head_dim = weight.shape[0] // (3 * heads)
        return (
            self.pinv_select is None and x.shape[1] > self.num_landmarks
            and self.num_landmarks <= head_dim and weight.dtype == x.dtype
            and compute_dtype(x.dtype) == x.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling()
        )

    def attend_projected(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, heads: int
    ) -> Tensor:
        """:meth:`_attend_unmasked` of the projections of x, computed from x and the
        projection (:func:`~formerlab.attention.nystrom_projected.nystrom_projected`):
        the same landmarks, inverse and diagnostics, six of its twelve large products
        fewer."""
        inverse, infos = self._recorded_inverse()
        conv_weight = None if self.conv is None else self.conv.head_weights(heads, x.dtype)
        head_dim = weight.shape[0] // (3 * heads)
        out = nystrom_projected(
            x, weight, bias, heads, self.num_landmarks, inverse, self._logit_scale(head_dim),
            conv_weight,
        )
        self.last_info = infos[0]
        return out

    def _logit_scale(self, head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim) if self.scale is None else self.scale

    def _recorded_inverse(self) -> tuple[Callable[[Tensor], Tensor], list[NystromInfo]]:
        """The inverse of the fused paths and the list its diagnostics are appended to."""
        infos: list[NystromInfo] = []

        def inverse(W: Tensor) -> Tensor:
            Z, info = self._direct_inverse(W)
            infos.append(info)
            return Z

        return inverse, infos

    def diagnostics(self) -> dict[str, float]:
        """Per-call statistics of the last forward for training logs."""
        info: NystromInfo | None = self.last_info
        if info is None:
            return {}
        out: dict[str, float] = {}
        if info.pinv is not None:
            out.update(info.pinv.summary())
        if info.selected is not None:
            key = "pinv_selected_iterations" if self.pinv_reg is None else f"pinv_selected_log10_{self.pinv_reg}"
            sel = info.selected.double()
            out[key] = (sel.mean() if self.pinv_reg is None else sel.log10().mean()).item()
        if info.val_error is not None:
            out["pinv_val_error"] = info.val_error.double().mean().item()
        return out

    def extra_repr(self) -> str:
        inv = (
            f"pinv_reg={self.pinv_reg!r}" if self.pinv_reg
            else f"pinv_iters={self.pinv_iters}, pinv_tol={self.pinv_tol}, order={self.pinv_order}"
        )
        sel = f", select={self.pinv_select}" if self.pinv_select else ""
        return f"num_landmarks={self.num_landmarks}, {inv}{sel}"


__all__ = ["DepthwiseConvSkip", "NystromAttention", "NystromInfo", "depthwise_conv_seq"]
