"""K-FAC / KFC (Martens & Grosse 2015; Grosse & Martens 2016): Kronecker factors ×
factored-damping inverse (default) or eigen form."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LOW_RANK_FIELDS, THINNING_FIELDS, LowRankConfig, ThinningConfig
from ..curvature import KroneckerFactors, kronecker_factors
from ..inverses import EigenInverse, FactoredInverse, InverseStrategy, LowRankFactoredInverse
from ..preconditioner import Preconditioner

__all__ = ["KFAC", "KFACConfig"]


@dataclass(kw_only=True)
class KFACConfig(LowRankConfig, ThinningConfig):
    """K-FAC's hyperparameters (see :class:`~natgrad.config.PreconditionerConfig` and
    :class:`~natgrad.config.LowRankConfig`, :class:`~natgrad.config.ThinningConfig`:
    ``statistics_positions``).

    Attributes:
        inverse: ``"factored"`` — ``Δ = G_d⁻¹ ∇W̄ A_d⁻¹`` with factored Tikhonov damping
            (Cholesky inverses; cheapest); ``"eigen"`` — eigendecompositions with damping
            ``λ`` on the Kronecker product exactly, ``(A ⊗ G + λI)⁻¹``.
        low_rank: (:class:`~natgrad.config.LowRankConfig`) with ``inverse="factored"``, a
            factor wider than ``max(low_rank_above, k)`` — ``A`` ``(d_in', d_in')`` or ``G``
            ``(d_out, d_out)`` — is kept as its top-``k`` eigenpairs ``U`` ``(n, k)``,
            ``Λ`` ``(k,)`` plus the mean ``r`` of its other eigenvalues on the rest,
            ``X ≈ U diag(Λ) Uᵀ + r(I − UUᵀ)``, whose damped inverse is applied in
            ``2·n·k·d`` instead of ``n²·d`` and refreshed by warm-started subspace
            iteration instead of an ``n³`` Cholesky (docs/math.md §2, "Wide factors";
            :class:`~natgrad.inverses.LowRankFactoredInverse`).
    """

    # Measured on the Fashion-MNIST CNN with SGD-momentum at lr 0.05 (docs/defaults.md):
    # λ = 0.1 with κ = 1e-3 trains without losing accuracy from epoch to epoch.
    damping: float = 1e-1
    kl_clip: float | None = 1e-3
    inverse: str = "factored"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inverse not in ("factored", "eigen"):
            raise ValueError(f"inverse must be 'factored' or 'eigen', got {self.inverse!r}")
        if self.low_rank is not None and self.inverse != "factored":
            raise ValueError(
                f"low_rank applies to inverse='factored' only, got low_rank={self.low_rank!r} "
                f"with inverse={self.inverse!r}"
            )


class KFAC(Preconditioner):
    """K-FAC for ``nn.Linear`` and ``nn.Conv2d``: block ``≈ A ⊗ G`` per layer.

    ``natgrad.KFAC(model)`` builds it with the defaults of :class:`KFACConfig`; see
    :class:`~natgrad.Preconditioner` for the other arguments.
    """

    config_class = KFACConfig
    # These decide what each layer stores.
    fixed_fields = ("inverse", *THINNING_FIELDS, *LOW_RANK_FIELDS)
    # build("kfac", model): the conv factors from 49 positions per sample, factors wider
    # than 2048 as rank 128 plus an isotropic rest (docs/defaults.md).
    recommended = {"statistics_positions": 49, "low_rank": 128}

    def make_curvature(self, shape, dtype, device) -> KroneckerFactors:
        return kronecker_factors(shape, dtype, device, self.config.statistics_positions)

    def make_inverse(self, shape, dtype, device) -> InverseStrategy:
        if self.config.inverse == "eigen":
            return EigenInverse(dtype, device, damping_mode="exact")
        if self.config.low_rank is not None:
            return LowRankFactoredInverse(
                dtype,
                device,
                shape=shape,
                rank=self.config.low_rank,
                above=self.config.low_rank_above,
            )
        return FactoredInverse(dtype, device)
