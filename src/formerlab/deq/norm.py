"""Weight and spectral normalisation of the layers inside an implicit function f.

DEQ models keep f well-behaved by re-parametrising its linear maps: weight normalisation
(Salimans & Kingma, 2016), used by Bai, Kolter & Koltun (2019) for DEQ sequence models,
and spectral normalisation (Miyato et al., 2018), which bounds each map's Lipschitz
constant by 1 (a sufficient condition towards a contractive f; Bai et al. 2021 note it is
often too restrictive in practice). Both use ``torch.nn.utils.parametrizations``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from formerlab.errors import check_choice, check_positive_int

NORMS = ("none", "weight", "spectral")


def _targets(module: nn.Module, types: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, types) and isinstance(getattr(m, "weight", None), nn.Parameter)
    ]


def apply_weight_norm(
    module: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear,)
) -> nn.Module:
    """Weight-normalise every ``types`` submodule: W = g * V / ||V|| row-wise. In place."""
    for m in _targets(module, types):
        weight_norm(m, name="weight", dim=0)
    return module


def apply_spectral_norm(
    module: nn.Module,
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    n_power_iterations: int = 1,
) -> nn.Module:
    """Spectrally normalise every ``types`` submodule: W / sigma_max(W). In place."""
    check_positive_int("n_power_iterations", n_power_iterations)
    for m in _targets(module, types):
        spectral_norm(m, name="weight", n_power_iterations=n_power_iterations)
    return module


def apply_norm(module: nn.Module, norm: str = "none") -> nn.Module:
    """``norm`` in ``("none", "weight", "spectral")`` applied to the Linear layers of ``module``."""
    check_choice("norm", norm, NORMS)
    if norm == "weight":
        return apply_weight_norm(module)
    if norm == "spectral":
        return apply_spectral_norm(module)
    return module


def remove_norm(module: nn.Module) -> nn.Module:
    """Fold any weight/spectral parametrisation back into plain weights. In place."""
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return module
