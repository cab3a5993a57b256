"""Sherman–Morrison K-FAC's inverse: ordinary K-FAC damped inverses, then rank-one
updates (docs/math.md, "Sherman–Morrison K-FAC"; Sherman–Morrison K-FAC paper, §2,
eqs. 6–8, Algorithm 1).

After the full inverses, each refresh takes ``u = sqrt(diag A)``, ``v = sqrt(diag G)``
of the current running factors and applies, in ``O(n²)``,

    (X + α u uᵀ)⁻¹ = X⁻¹ − (X⁻¹u)(X⁻¹u)ᵀ / (1/α + uᵀX⁻¹u)     (eq. 7; eq. 8 for G, β)

Two readings of *which* ``X⁻¹`` (``reading=``):

* ``"paper"``: the text keeps the inverse of the last full update and uses *it* for every
  later update, ``A_t⁻¹ ≈ (A_k + α u_t u_tᵀ)⁻¹``; Algorithm 1's test ``t <= k`` (with
  ``t`` counting from 0) makes that ``k + 1`` full inverses, ``t = 0 … k``.
* ``"chained"``: ``k`` full inverses, then each update starts from the previous
  approximation, so the matrix inverted is ``A_k + α Σ_j u_j u_jᵀ`` — the rank-one terms
  accumulate.

The damping is inside the full inverses; later refreshes do not use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..config import check_positive
from ..curvature import Curvature
from ..linalg import DecompositionError, damped_inverse, kron_precondition
from .base import InverseStrategy
from .factored import trace_pi

__all__ = ["ShermanMorrisonInverse", "sherman_morrison_update", "SM_READINGS"]

#: Readings of the rank-one phase (module docstring).
SM_READINGS = ("paper", "chained")


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
    """``Δ = G⁻¹ ∇W̄ A⁻¹`` with inverses from full K-FAC updates, then rank-one
    Sherman–Morrison updates.

    Args:
        k: the paper's ``k`` (integer >= 0). The full updates use factored Tikhonov damping
            ``A + π·sqrt(λ)I``, ``G + (sqrt(λ)/π)I`` with ``π = pi(A, G)``.
        reading: ``"paper"`` (``k + 1`` full inverses; every rank-one update starts from
            the last of them) or ``"chained"`` (``k`` full inverses; each rank-one update
            starts from the previous approximation). With ``"chained"`` and ``k = 0`` the
            rank-one updates start from the damping alone, ``(π·sqrt(λ))⁻¹I`` and
            ``(sqrt(λ)/π)⁻¹I``, ``π`` from the traces of the diagonals.
        alpha, beta: weights ``α``, ``β`` (> 0) of the rank-one terms for ``A`` and ``G``.
        pi: the damping split (K-FAC's :func:`~natgrad.inverses.trace_pi` by default).

    The curvature must provide ``factors()`` (full updates) and ``diagonals()``
    (rank-one updates), as :class:`~natgrad.curvature.DiagonalSwitchFactors` does.

    Attributes:
        A_inv, G_inv: ``(d_in', d_in')``, ``(d_out, d_out)``, the current approximations.
        A_base_inv, G_base_inv: under ``"paper"``, the inverses of the last full update
            (every rank-one update starts from them); ``None`` under ``"chained"``.
        full_updates, rank_one_updates: refreshes done in each phase.
    """

    _state_keys = (
        "A_inv",
        "G_inv",
        "A_base_inv",
        "G_base_inv",
        "full_updates",
        "rank_one_updates",
    )

    def __init__(
        self,
        *args,
        k: int = 10,
        alpha: float = 0.1,
        beta: float = 0.1,
        reading: str = "paper",
        pi: Callable[[Tensor, Tensor], float] = trace_pi,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        check_positive("alpha", alpha)
        check_positive("beta", beta)
        check_reading(reading)
        self.k, self.alpha, self.beta, self.pi = k, alpha, beta, pi
        self.reading = reading
        self.A_inv: Tensor | None = None
        self.G_inv: Tensor | None = None
        self.A_base_inv: Tensor | None = None
        self.G_base_inv: Tensor | None = None
        self.full_updates = 0
        self.rank_one_updates = 0

    @property
    def ready(self) -> bool:
        return self.A_inv is not None

    @property
    def full_inverses(self) -> int:
        """Full K-FAC inverse updates before the rank-one phase: ``k + 1`` under
        ``"paper"`` (Algorithm 1's ``t <= k``), ``k`` under ``"chained"``."""
        return self.k + 1 if self.reading == "paper" else self.k

    @property
    def in_rank_one_phase(self) -> bool:
        """Whether the next refresh is a rank-one update (the full updates are done)."""
        return self.full_updates >= self.full_inverses

    def refresh(self, curvature: Curvature, damping: float) -> None:
        if not self.in_rank_one_phase:
            A, G = curvature.factors()
            pi, root = self.pi(A, G), math.sqrt(damping)
            A_inv, G_inv = damped_inverse(A, pi * root), damped_inverse(G, root / pi)
            self.A_inv, self.G_inv = A_inv, G_inv
            if self.reading == "paper":
                self.A_base_inv, self.G_base_inv = A_inv, G_inv
            self.full_updates += 1
            return
        d_A, d_G = curvature.diagonals()
        if self.reading == "paper" and self.A_base_inv is not None:
            A_inv, G_inv = self.A_base_inv, self.G_base_inv
        else:
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

    def load_state_dict(self, state: dict[str, Any], *, partial: bool = False) -> None:
        """As :meth:`Stateful.load_state_dict`; a checkpoint written before the base
        inverses were kept (no ``A_base_inv``) loads with none, so a ``"paper"`` run
        resumed from it continues from its current inverses."""
        if not partial:
            state = {"A_base_inv": None, "G_base_inv": None, **state}
        super().load_state_dict(state, partial=partial)


def check_reading(reading: str) -> None:
    """Raise ``ValueError`` unless ``reading`` is one of :data:`SM_READINGS`."""
    if reading not in SM_READINGS:
        raise ValueError(f"reading must be one of {SM_READINGS}, got {reading!r}")
