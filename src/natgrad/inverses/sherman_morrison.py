"""Sherman–Morrison K-FAC's inverse: ``k`` ordinary K-FAC damped inverses, then rank-one
updates (MATH.md, Sherman–Morrison K-FAC; ``000_…`` §2, eqs. 6–8, Algorithm 1).

After the ``k``-th full inverse, each refresh takes ``u = sqrt(diag A)``,
``v = sqrt(diag G)`` of the current running factors and updates the previous
approximations in ``O(n²)``:

    A⁻¹ ← (A + α u uᵀ)⁻¹ = A⁻¹ − (A⁻¹u)(A⁻¹u)ᵀ / (1/α + uᵀA⁻¹u)     (eq. 7)
    G⁻¹ ← (G + β v vᵀ)⁻¹ = G⁻¹ − (G⁻¹v)(G⁻¹v)ᵀ / (1/β + vᵀG⁻¹v)     (eq. 8)

where ``A``, ``G`` on the right are the matrices the stored inverses invert: the damped
factors of the last full update plus every rank-one term added since. The damping is
inside the first inverses; later refreshes do not use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..config import check_positive
from ..curvature import Curvature
from ..linalg import DecompositionError, damped_inverse, kron_precondition
from .base import InverseStrategy
from .factored import trace_pi

__all__ = ["ShermanMorrisonInverse", "sherman_morrison_update"]


def sherman_morrison_update(X_inv: Tensor, u: Tensor, alpha: float) -> Tensor:
    """``(X + α u uᵀ)⁻¹ = X⁻¹ − (X⁻¹u)(X⁻¹u)ᵀ / (1/α + uᵀX⁻¹u)`` for symmetric ``X⁻¹``
    ``(n, n)`` and ``u`` ``(n,)``; ``O(n²)``.

    One fused pass over the ``n × n`` result (``addr``). Finiteness is checked in ``O(n)``:
    with a finite ``X⁻¹``, a finite ``w = X⁻¹u`` and a finite ``max|w|²/denom`` every entry of
    the result is finite.

    Raises:
        DecompositionError: the update would not be finite (``X⁻¹`` or ``u`` not usable).
    """
    w = X_inv @ u
    denom = 1.0 / alpha + torch.dot(u, w)
    bound = w.abs().max().square() / denom
    if not (torch.isfinite(w).all() and torch.isfinite(bound) and denom > 0):
        raise DecompositionError("Sherman–Morrison update produced non-finite entries")
    return torch.addr(X_inv, w, w, alpha=-1.0 / denom.item())


class ShermanMorrisonInverse(InverseStrategy):
    """``Δ = G⁻¹ ∇W̄ A⁻¹`` with inverses from ``k`` full K-FAC updates, then rank-one
    Sherman–Morrison updates.

    Args:
        k: number of full K-FAC inverse updates before the rank-one phase (>= 0). The
            full updates use factored Tikhonov damping ``A + π·sqrt(λ)I``,
            ``G + (sqrt(λ)/π)I`` with ``π = pi(A, G)``. With ``k = 0`` the rank-one
            updates start from the damping alone, ``(π·sqrt(λ))⁻¹I`` and
            ``(sqrt(λ)/π)⁻¹I``, ``π`` from the traces of the diagonals.
        alpha, beta: weights ``α``, ``β`` (> 0) of the rank-one terms for ``A`` and ``G``.
        pi: the damping split (K-FAC's :func:`~natgrad.inverses.trace_pi` by default).

    The curvature must provide ``factors()`` (full updates) and ``diagonals()``
    (rank-one updates), as :class:`~natgrad.curvature.DiagonalSwitchFactors` does.

    Attributes:
        A_inv, G_inv: ``(d_in', d_in')``, ``(d_out, d_out)``, the current approximations.
        full_updates, rank_one_updates: refreshes done in each phase.
    """

    _state_keys = ("A_inv", "G_inv", "full_updates", "rank_one_updates")

    def __init__(
        self,
        *args,
        k: int = 10,
        alpha: float = 0.1,
        beta: float = 0.1,
        pi: Callable[[Tensor, Tensor], float] = trace_pi,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        check_positive("alpha", alpha)
        check_positive("beta", beta)
        self.k, self.alpha, self.beta, self.pi = k, alpha, beta, pi
        self.A_inv: Tensor | None = None
        self.G_inv: Tensor | None = None
        self.full_updates = 0
        self.rank_one_updates = 0

    @property
    def ready(self) -> bool:
        return self.A_inv is not None

    @property
    def in_rank_one_phase(self) -> bool:
        """Whether the next refresh is a rank-one update (``k`` full updates are done)."""
        return self.full_updates >= self.k

    def refresh(self, curvature: Curvature, damping: float) -> None:
        if not self.in_rank_one_phase:
            A, G = curvature.factors()
            pi, root = self.pi(A, G), math.sqrt(damping)
            A_inv, G_inv = damped_inverse(A, pi * root), damped_inverse(G, root / pi)
            self.A_inv, self.G_inv = A_inv, G_inv
            self.full_updates += 1
            return
        d_A, d_G = curvature.diagonals()
        A_inv, G_inv = self.A_inv, self.G_inv
        if A_inv is None:
            A_inv, G_inv = self._damping_only(d_A, d_G, damping)
        A_inv = sherman_morrison_update(A_inv, d_A.clamp_min(0).sqrt(), self.alpha)
        G_inv = sherman_morrison_update(G_inv, d_G.clamp_min(0).sqrt(), self.beta)
        self.A_inv, self.G_inv = A_inv, G_inv
        self.rank_one_updates += 1

    def refresh_cost(self, shape: tuple[int, int]) -> float:
        """``d_out² + d_in'²``: a rank-one update is two ``O(n²)`` matrix–vector products
        and an outer product per factor. The ``k`` full ``O(n³)`` updates at the start
        are left out: the work assignment is fixed for the whole run, which is the
        rank-one phase but for its first ``k·T_inv`` steps."""
        d_out, d_in = shape
        return float(d_out) ** 2 + float(d_in) ** 2

    def _damping_only(self, d_A: Tensor, d_G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        """``((π·sqrt(λ))⁻¹ I, (sqrt(λ)/π)⁻¹ I)``: the starting point when ``k = 0``."""
        pi, root = self.pi(torch.diag(d_A), torch.diag(d_G)), math.sqrt(damping)
        eye_A = torch.eye(d_A.shape[0], dtype=d_A.dtype, device=d_A.device)
        eye_G = torch.eye(d_G.shape[0], dtype=d_G.dtype, device=d_G.device)
        return eye_A / (pi * root), eye_G * (pi / root)

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """``(A_inv ⊗ G_inv)⁻¹`` from the stored approximate inverses (after the rank-one
        updates no dense factor is kept to build it from)."""
        return torch.linalg.inv(torch.kron(self.A_inv.T.contiguous(), self.G_inv.contiguous()))

    def apply(self, grad: Tensor, damping: float) -> Tensor:
        return kron_precondition(self.G_inv, grad, self.A_inv)
