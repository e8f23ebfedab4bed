"""The start of the iteration: the exact power-of-two scaling of A, the initial scale α of
Z₀ = αAᵀ per ``init``, and the norm estimates (power iteration, a certain upper bound of
σ_max) that it and the certificate use.

**Scale.** A is divided by 2^e (e the binary exponent of max|A|, ``torch.frexp``) before the
iteration — exact, so every norm is O(1) in any dtype — and Z is multiplied by 2^−e after
(in float64). A result that overflows the output dtype is a failure (``on_fail``), never an
inf with a success flag.

Initial scale α, computed **per matrix** (``init``):

* ``"razavi"``: α = 1/(‖A‖₁‖A‖∞) (σ_max² <= ‖A‖₁‖A‖∞);
* ``"frobenius"``: α = 1/‖A‖_F²;
* ``"spectral"``: α = 1/(1.05·σ̂²), σ̂ from 8 power iterations on AᵀA (σ̂ <= σ_max, so
  AZ₀ has eigenvalues <= 1/1.05·σ_max²/σ̂², below 2 unless σ̂ is off by 27 %);
* ``"global"``: α = 1/(maxᵦ‖Aᵦ‖₁ · maxᵦ‖Aᵦ‖∞), one scale for the whole batch as in the
  public Nyströmformer implementations. It warns; kept only to reproduce their failure: in a
  batch whose matrices differ in scale, the small ones start with eigenvalues of AZ₀ orders
  of magnitude below 1 and get nowhere in a fixed number of iterations (the power-of-two
  normalisation is per matrix, so it is undone for this init);
* ``"auto"``: :data:`~formerlab.linalg.pinv.AUTO_INIT` — the measured choice (see ``formerlab pinv-study`` and
  the README): the fewest matmuls of the safe inits on row-softmax and random matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerlab.linalg.pinv.options import INITS

SPECTRAL_MARGIN = 1.05
SPECTRAL_POWER_STEPS = 8


def _safe_reciprocal(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / x.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _fro(x: Tensor) -> Tensor:
    return x.flatten(-2).norm(dim=-1)


def binary_exponent(A: Tensor) -> Tensor:
    """e per matrix of a (b, m, n) batch with max|A| = μ·2^e, μ in [0.5, 1) (0 for A = 0)."""
    _, e = torch.frexp(A.detach().abs().amax(dim=(-2, -1)))
    return e.long()


def scale_pow2(x: Tensor, e: Tensor) -> Tensor:
    """x·2^e per matrix of a (b, r, c) batch, exactly (two factors, so none overflows)."""
    half = torch.div(e, 2, rounding_mode="floor")
    two = torch.tensor(2.0, dtype=x.dtype, device=x.device)
    f1 = torch.pow(two, half.to(x.dtype))[:, None, None]
    f2 = torch.pow(two, (e - half).to(x.dtype))[:, None, None]
    return x * f1 * f2


def power_start(n: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """The fixed start vector (n,) of :func:`spectral_norm_estimate`: pseudo-random entries
    in [−0.5, 0.5) from a hash of the index, not a ``torch.Generator`` (which would break a
    ``torch.compile`` graph), so every call and every compiled graph sees the same vector."""
    i = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return (torch.frac(torch.sin(i * 12.9898) * 43758.5453) - 0.5).to(dtype)


def spectral_norm_estimate(A: Tensor, steps: int = SPECTRAL_POWER_STEPS) -> Tensor:
    """σ̂ <= σ_max(A) for each matrix of a (b, m, n) batch, by power iteration on AᵀA.

    The start vector is a fixed pseudo-random vector (deterministic results); the result
    is the larger of the Rayleigh quotient and the certain lower bound ‖A‖_F/√min(m, n).
    """
    b, m, n = A.shape
    v = power_start(n, A.dtype, A.device)
    v = (v / v.norm()).expand(b, n).unsqueeze(-1)
    for _ in range(steps):
        w = A.mT @ (A @ v)
        v = w * _safe_reciprocal(w.norm(dim=-2, keepdim=True))
    rayleigh = (A @ v).square().sum(dim=(-2, -1))
    lower = A.square().sum(dim=(-2, -1)) / min(m, n)
    return torch.maximum(rayleigh, lower).sqrt()


def spectral_norm_upper(A: Tensor, squarings: int = 3) -> Tensor:
    """A certain upper bound of σ_max(A) per matrix of a (b, m, n) batch, in float64.

    σ_max² = λ_max(M), M = AAᵀ (or AᵀA, the smaller), and λ_max <= ‖M^q‖_∞^(1/q) for every
    q; q = 2^squarings by repeated squaring (each square normalised, so nothing overflows),
    which is tight to a factor r^(1/q) (r = size of M). Capped by ‖A‖_F and widened for the
    rounding of the products.
    """
    M = A @ A.mT if A.shape[-2] <= A.shape[-1] else A.mT @ A
    r = M.shape[-1]
    c = M.abs().sum(-1).amax(-1)
    log_bound = torch.log(c.double())
    weight = 1.0
    for _ in range(squarings):
        M = M * _safe_reciprocal(c)[:, None, None]
        M = M @ M
        c = M.abs().sum(-1).amax(-1)
        weight /= 2
        log_bound = log_bound + weight * torch.log(c.double())
    lam = torch.exp(log_bound).nan_to_num(nan=0.0)
    lam = torch.minimum(lam, A.double().square().sum(dim=(-2, -1)))
    margin = 1 + 16 * (r + 1) * torch.finfo(A.dtype).eps
    return (lam * margin).sqrt()


def initial_scale(A: Tensor, init: str) -> Tensor:
    """α of the start Z₀ = αAᵀ for each matrix of a (b, m, n) batch, shape (b, 1, 1)."""
    absA = A.abs()
    if init == "razavi":
        bound = absA.sum(-2).amax(-1) * absA.sum(-1).amax(-1)
    elif init == "frobenius":
        bound = A.square().sum(dim=(-2, -1))
    elif init == "spectral":
        bound = SPECTRAL_MARGIN * spectral_norm_estimate(A).square()
    elif init == "global":
        # one scale for the whole batch (public Nyströmformer code): reproduces its failure
        bound = (absA.sum(-2).amax() * absA.sum(-1).amax()).expand(A.shape[0])
    else:
        raise ValueError(f"init={init!r} is not allowed; expected one of {list(INITS)}")
    return _safe_reciprocal(bound)[:, None, None]
