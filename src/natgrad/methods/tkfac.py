"""TKFAC (Gao et al., AAAI 2021, arXiv 2011.10741): trace-restricted factors
``F_l ≈ δ·Φ ⊗ Ψ`` with K-FAC's inverse form and trace-based damping for CNNs
(docs/math.md §4, §6)."""

from __future__ import annotations

from dataclasses import dataclass

from ..block import LayerBlock
from ..curvature import TraceRestrictedFactors
from ..damping import DampingPolicy, TraceDamping, TraceDampingConfig
from ..inverses import FactoredInverse, unit_pi
from ..preconditioner import Preconditioner

__all__ = ["TKFAC", "TKFACConfig"]


@dataclass(kw_only=True)
class TKFACConfig(TraceDampingConfig):
    """TKFAC's hyperparameters (see :class:`~natgrad.damping.TraceDampingConfig`).

    ``trace_floor = 0.01`` is Gao et al. 2020's best ``ϑ``; damping ``1e-3``,
    ``ε = 0.95``, ``T_cov = 10``, ``T_inv = 100`` and KL clip ``1e-2`` follow the
    K-FAC/EKFAC settings of Xu 2021 (Gao et al. 2020 tune damping over {1e-8 … 3e-1}).
    """

    damping: float = 1e-3
    kl_clip: float | None = 1e-2


class TKFAC(Preconditioner):
    """TKFAC for ``nn.Linear`` and ``nn.Conv2d``: ``Δ = Ψ̂⁻¹ ∇W̄ Φ̂⁻¹`` with
    ``Φ̂ = sqrt(δ)Φ + sqrt(λ_l)I`` and ``Ψ̂ = sqrt(δ)Ψ + sqrt(λ_l)I``.

    Preconditioner reading: this is docs/math.md §4's form *without* a further ``1/δ``.
    ``Φ̂ ⊗ Ψ̂ = δ Φ⊗Ψ + sqrt(δλ)(Φ⊗I + I⊗Ψ) + λI`` is the trace-restricted block plus
    K-FAC-style factored damping, so its inverse is the damped natural gradient of the
    block ``δ Φ⊗Ψ``, whose trace equals ``tr F_l``. The third-party reading
    ``(1/δ)·Ψ̂⁻¹ ∇W̄ Φ̂⁻¹`` would instead invert ``δ²Φ⊗Ψ + …``, a block whose scale is
    ``δ`` times that of ``F_l`` (not a natural gradient, and its step size would depend
    on the gradient's magnitude). The TKFAC paper's full text was not reachable through
    the search tool; a public third-party documentation of TKFAC (the ``zij`` library's
    TKFAC page) also writes the update as ``(Φ̂⁻¹ ⊗ Ψ̂⁻¹)`` applied to the gradient, with
    no ``1/δ``.

    The curvature's ``factors()`` are ``(sqrt(δ)Φ, sqrt(δ)Ψ)``, so the inverse is
    K-FAC's :class:`~natgrad.inverses.FactoredInverse` with the even split ``π = 1``.
    Damping: :class:`~natgrad.damping.TraceDamping` with ``tr F̂_l = δ``.
    """

    config_class = TKFACConfig

    def make_curvature(self, shape, dtype, device) -> TraceRestrictedFactors:
        return TraceRestrictedFactors(shape, dtype, device)

    def make_inverse(self, shape, dtype, device) -> FactoredInverse:
        return FactoredInverse(dtype, device, pi=unit_pi)

    def make_damping(self) -> DampingPolicy:
        return TraceDamping(delta_trace)


def delta_trace(block: LayerBlock) -> float | None:
    """``tr(δ Φ⊗Ψ) = δ`` of the block's curvature (``None`` before its first batch)."""
    return block.curvature.trace() if block.curvature.initialized else None
