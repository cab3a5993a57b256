"""Sherman–Morrison K-FAC (``000_…``): ``k`` ordinary K-FAC inverse updates, then rank-one
Sherman–Morrison updates from the factors' diagonals, which are then all that is
accumulated (MATH.md, Sherman–Morrison K-FAC)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PreconditionerConfig, check_positive
from ..curvature import DiagonalSwitchFactors
from ..inverses import ShermanMorrisonInverse
from ..preconditioner import Preconditioner

__all__ = ["SMKFAC", "SMKFACConfig"]


@dataclass(kw_only=True)
class SMKFACConfig(PreconditionerConfig):
    """Sherman–Morrison K-FAC's hyperparameters, defaults from ``000_…`` §3: ``k = 10``,
    ``α = β = 0.1``, ``T_cov = 10``, ``T_inv = 100``, damping ``1e-3`` (factored
    Tikhonov, eq. 4). The paper gives no decay nor KL clip; ``decay = 0.95`` and
    ``kl_clip = 1e-3`` are MATH.md's K-FAC defaults.

    Attributes:
        k: full K-FAC inverse updates before the rank-one phase (integer >= 0).
        alpha, beta: weights (> 0) of the rank-one terms ``α u uᵀ`` (``A``) and
            ``β v vᵀ`` (``G``).
    """

    damping: float = 1e-3
    k: int = 10
    alpha: float = 0.1
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be an integer >= 0, got {self.k!r}")
        check_positive("alpha", self.alpha)
        check_positive("beta", self.beta)


class SMKFAC(Preconditioner):
    """Sherman–Morrison K-FAC for ``nn.Linear`` and ``nn.Conv2d``: ``Δ = G⁻¹ ∇W̄ A⁻¹``.

    Per layer, :class:`~natgrad.inverses.ShermanMorrisonInverse` does ``k`` full K-FAC
    inverse updates (every ``T_inv`` steps, factored damping), then rank-one updates
    ``A⁻¹ ← (A + α u uᵀ)⁻¹``, ``G⁻¹ ← (G + β v vᵀ)⁻¹`` with ``u = sqrt(diag A)``,
    ``v = sqrt(diag G)``. Once a layer's ``k`` full updates are done, its
    :class:`~natgrad.curvature.DiagonalSwitchFactors` stops forming ``A``, ``G`` and
    accumulates only their diagonals (``O(n)`` per row instead of ``O(n²)``).

    After the switch ``damping`` no longer enters (it is inside the first inverses), and
    ``factors()`` returns the diagonal matrices that are then tracked. ``k`` may be
    changed with :meth:`configure`; a layer already switched stays switched (its full
    factors are gone).
    """

    config_class = SMKFACConfig

    def make_curvature(self, shape, dtype, device) -> DiagonalSwitchFactors:
        return DiagonalSwitchFactors(shape, dtype, device, diagonal_only=self.config.k == 0)

    def make_inverse(self, shape, dtype, device) -> ShermanMorrisonInverse:
        c = self.config
        return ShermanMorrisonInverse(dtype, device, k=c.k, alpha=c.alpha, beta=c.beta)

    def sync_layers(self) -> None:
        """Push ``k``, ``α``, ``β`` to the inverses; switch every layer whose ``k`` full
        inverse updates are done to diagonal-only accumulation."""
        for block in self.layers.values():
            inverse = block.inverse
            inverse.k, inverse.alpha, inverse.beta = (
                self.config.k,
                self.config.alpha,
                self.config.beta,
            )
            if inverse.in_rank_one_phase:
                block.curvature.switch_to_diagonal()
