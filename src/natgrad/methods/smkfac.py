"""Sherman–Morrison K-FAC (Liu, Gao & Wang 2021): ordinary K-FAC inverse updates, then
rank-one Sherman–Morrison updates from the factors' diagonals, which are then all that is
accumulated (docs/math.md §8)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PreconditionerConfig, check_positive
from ..curvature import DiagonalSwitchFactors
from ..inverses import ShermanMorrisonInverse
from ..inverses.sherman_morrison import check_reading
from ..preconditioner import Preconditioner

__all__ = ["SMKFAC", "SMKFACConfig"]


@dataclass(kw_only=True)
class SMKFACConfig(PreconditionerConfig):
    """Sherman–Morrison K-FAC's hyperparameters, defaults from Liu, Gao & Wang 2021, §3:
    ``k = 10``, ``α = β = 0.1``, ``T_cov = 10``, ``T_inv = 100``, damping ``1e-3``
    (factored Tikhonov, eq. 4), the paper's reading of the rank-one phase. The paper gives
    no decay and does not clip; ``decay = 0.95`` and ``kl_clip = 1e-3`` are K-FAC's
    defaults (docs/math.md §2; the ``smkfac`` bench preset sets ``kl_clip=None``).

    Attributes:
        k: the paper's ``k`` (integer >= 0): the full K-FAC inverse updates before the
            rank-one phase are ``k + 1`` under ``reading="paper"``, ``k`` under
            ``"chained"``.
        alpha, beta: weights (> 0) of the rank-one terms ``α u uᵀ`` (``A``) and
            ``β v vᵀ`` (``G``).
        reading: ``"paper"`` (default: every rank-one update starts from the last full
            inverse, eqs. 7–8, and Algorithm 1's ``t <= k`` gives ``k + 1`` full inverses)
            or ``"chained"`` (each update starts from the previous approximation, so the
            rank-one terms accumulate); docs/math.md §8, §9.2.
    """

    damping: float = 1e-3
    k: int = 10
    alpha: float = 0.1
    beta: float = 0.1
    reading: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be an integer >= 0, got {self.k!r}")
        check_positive("alpha", self.alpha)
        check_positive("beta", self.beta)
        check_reading(self.reading)


class SMKFAC(Preconditioner):
    """Sherman–Morrison K-FAC for ``nn.Linear`` and ``nn.Conv2d``: ``Δ = G⁻¹ ∇W̄ A⁻¹``.

    Per layer, :class:`~natgrad.inverses.ShermanMorrisonInverse` does ``k + 1`` (paper) or
    ``k`` (chained) full K-FAC inverse updates (every ``T_inv`` steps, factored damping),
    then rank-one updates ``A⁻¹ ≈ (A_k + α u uᵀ)⁻¹`` (paper) or
    ``A⁻¹ ← (A + α u uᵀ)⁻¹`` from the previous one (chained), the same for ``G`` with
    ``v``, ``β``, where ``u = sqrt(diag A)``, ``v = sqrt(diag G)``. Once a layer's full
    updates are done, its :class:`~natgrad.curvature.DiagonalSwitchFactors` stops forming
    ``A``, ``G`` and accumulates only their diagonals (``O(n)`` per row instead of
    ``O(n²)``).

    After the switch ``damping`` no longer enters (it is inside the first inverses), and
    ``factors()`` returns the diagonal matrices that are then tracked. ``k`` may be
    changed with :meth:`configure`; a layer already switched stays switched (its full
    factors are gone); so may ``reading``, which then applies from the next refresh.
    """

    config_class = SMKFACConfig

    def make_curvature(self, shape, dtype, device) -> DiagonalSwitchFactors:
        diagonal_only = self.config.k == 0 and self.config.reading == "chained"
        return DiagonalSwitchFactors(shape, dtype, device, diagonal_only=diagonal_only)

    def make_inverse(self, shape, dtype, device) -> ShermanMorrisonInverse:
        c = self.config
        return ShermanMorrisonInverse(
            dtype, device, k=c.k, alpha=c.alpha, beta=c.beta, reading=c.reading
        )

    def sync_layers(self) -> None:
        """Push ``k``, ``α``, ``β`` and the reading to the inverses; switch every layer
        whose full inverse updates are done to diagonal-only accumulation."""
        for block in self.layers.values():
            inverse = block.inverse
            inverse.k, inverse.alpha, inverse.beta = (
                self.config.k,
                self.config.alpha,
                self.config.beta,
            )
            inverse.reading = self.config.reading
            if inverse.in_rank_one_phase:
                block.curvature.switch_to_diagonal()
