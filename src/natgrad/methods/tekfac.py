"""TEKFAC (Gao et al. 2020): the eigenvalue correction of EKFAC in TKFAC's eigenbasis,
with TKFAC's trace-based damping (docs/math.md §5, §6)."""

from __future__ import annotations

from dataclasses import dataclass

from ..block import LayerBlock
from ..config import LOW_RANK_FIELDS, LowRankConfig
from ..curvature import TraceRestrictedFactors
from ..damping import DampingPolicy, TraceDamping, TraceDampingConfig
from ..inverses.eigen_corrected import RescaledBasisInverse
from ..preconditioner import Preconditioner
from .ekfac import RescalingConfig, make_rescaled_inverse, sync_rescaling

__all__ = ["TEKFAC", "TEKFACConfig"]


@dataclass(kw_only=True)
class TEKFACConfig(TraceDampingConfig, RescalingConfig, LowRankConfig):
    """TEKFAC's hyperparameters: :class:`~natgrad.damping.TraceDampingConfig`'s,
    :class:`~natgrad.methods.ekfac.RescalingConfig`'s and
    :class:`~natgrad.config.LowRankConfig`'s (``low_rank``: the input side of ``Q_Φ`` as
    low rank, as EKFAC's).

    ``trace_floor = 0.01`` (``ϑ``) is Gao et al. 2020's best value; the schedules and
    damping follow EKFAC's (Xu 2021). Gao et al. keep separate decays for ``Θ``
    (``rescale_decay``, their ``β₁``, eq. 3.6) and the factors (``decay``, ``β₂``); the
    values are missing from our copy, so ``rescale_decay`` defaults to ``decay``.
    ``scale_rule`` is ``"running"``: eq. 3.6 averages ``Θ``.
    """

    damping: float = 1e-3
    kl_clip: float | None = 1e-2


class TEKFAC(Preconditioner):
    """TEKFAC for ``nn.Linear`` and ``nn.Conv2d``:
    ``Δ = Q_Ψ [ (Q_Ψᵀ ∇W̄ Q_Φ) ⊘ (Θ + λ_l) ] Q_Φᵀ`` (Gao et al. 2020, eq. 3.9).

    ``Q_Φ``, ``Q_Ψ`` are the eigenbases of TKFAC's running ``Φ``, ``Ψ`` (every ``T_inv``
    steps); ``Θ = E[(Q_Ψᵀ ∇W̄_i Q_Φ)^{⊙2}]`` (every ``T_s`` steps, restarted in a new
    basis, initialised to TKFAC's own eigenvalues ``δ·ψ φᵀ``). Damping:
    :class:`~natgrad.damping.TraceDamping` with ``tr F̂_l = tr Θ_l`` of the re-scaling in
    force when the step is taken (after that step's refresh and observation).
    """

    config_class = TEKFACConfig
    # These decide what each layer stores.
    fixed_fields = LOW_RANK_FIELDS
    # build("tekfac", model): an input factor wider than 2048 as its top 128
    # eigenvectors plus one re-scaling per output direction on the rest
    # (docs/defaults.md).
    recommended = {"low_rank": 128}

    def make_curvature(self, shape, dtype, device) -> TraceRestrictedFactors:
        return TraceRestrictedFactors(shape, dtype, device)

    def make_inverse(self, shape, dtype, device) -> RescaledBasisInverse:
        return make_rescaled_inverse(self.config, shape, dtype, device)

    def make_damping(self) -> DampingPolicy:
        return TraceDamping(theta_trace)

    def sync_layers(self) -> None:
        sync_rescaling(self)


def theta_trace(block: LayerBlock) -> float | None:
    """``tr Θ_l`` once the re-scaling exists, else TKFAC's ``δ`` (``None`` before any batch)."""
    if block.inverse.ready:
        return block.inverse.trace()
    return block.curvature.trace() if block.curvature.initialized else None
