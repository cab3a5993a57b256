"""K-FAC's inverse form: ``Δ = G_d⁻¹ ∇W̄ A_d⁻¹`` with factored Tikhonov damping."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..curvature import Curvature
from ..linalg import damped_inverse, eye_like, factored_damping_pi, kron_precondition
from .base import InverseStrategy

__all__ = ["FactoredInverse", "trace_pi", "unit_pi"]


def trace_pi(A: Tensor, G: Tensor) -> float:
    """K-FAC's split ``π = sqrt((tr A/dim A)/(tr G/dim G))`` (docs/math.md §2; Liu, Gao &
    Wang 2021, eq. 4)."""
    return factored_damping_pi(A, G)


def unit_pi(A: Tensor, G: Tensor) -> float:
    """The even split ``π = 1``: ``sqrt(λ)`` on each factor (TKFAC's damping)."""
    return 1.0


class FactoredInverse(InverseStrategy):
    """Explicit inverses of the damped factors, by Cholesky.

    With ``(A, G) = curvature.factors()`` and split ``π = pi(A, G)``:
    ``A_d = A + π·sqrt(λ)·I``, ``G_d = G + (sqrt(λ)/π)·I`` and ``Δ = G_d⁻¹ ∇W̄ A_d⁻¹``.
    Damping is fixed at each refresh; :meth:`apply` costs two matmuls.

    Args:
        pi: how ``sqrt(λ)`` is split between the factors (:func:`trace_pi` by default).
    """

    _state_keys = ("A_inv", "G_inv")

    def __init__(self, *args, pi: Callable[[Tensor, Tensor], float] = trace_pi, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pi = pi
        self.A_inv: Tensor | None = None
        self.G_inv: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.A_inv is not None

    def refresh(self, curvature: Curvature, damping: float) -> None:
        A, G = curvature.factors()
        pi = self.pi(A, G)
        root = math.sqrt(damping)
        A_inv = damped_inverse(A, pi * root)
        G_inv = damped_inverse(G, root / pi)
        self.A_inv, self.G_inv = A_inv, G_inv

    def apply(self, grad: Tensor, damping: float) -> Tensor:
        return kron_precondition(self.G_inv, grad, self.A_inv)

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """``A_d ⊗ G_d`` from the curvature's current factors."""
        A, G = curvature.factors()
        pi, root = self.pi(A, G), math.sqrt(damping)
        eye_A, eye_G = eye_like(A), eye_like(G)
        return torch.kron(A + pi * root * eye_A, G + root / pi * eye_G)
