"""K-FAC's eigen form: a diagonal inverse in the Kronecker eigenbasis ``Q_A``, ``Q_G``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..curvature import Curvature
from ..linalg import eigen_precondition, eye_like, factored_damping_pi, kronecker_eigenbases
from .base import InverseStrategy

__all__ = ["EigenInverse"]


class EigenInverse(InverseStrategy):
    """``Δ = Q_G [ (Q_Gᵀ ∇W̄ Q_A) ⊘ scale ] Q_Aᵀ`` from ``A = Q_A diag(α) Q_Aᵀ``,
    ``G = Q_G diag(γ) Q_Gᵀ``.

    Args:
        damping_mode: ``"exact"`` — ``scale = γ αᵀ + λ``, the exact inverse of
            ``A ⊗ G + λI``; ``"factored"`` — ``scale = (γ + sqrt(λ)/π)(α + π·sqrt(λ))ᵀ``,
            equal to :class:`~natgrad.inverses.FactoredInverse`'s result.

    Attributes:
        Q_A: ``(d_in', d_in')`` eigenvectors of ``A``; ``alpha`` its eigenvalues ``(d_in',)``.
        Q_G: ``(d_out, d_out)`` eigenvectors of ``G``; ``gamma`` its eigenvalues ``(d_out,)``.
    """

    _state_keys = ("Q_A", "alpha", "Q_G", "gamma", "pi")
    damping_in_refresh = False

    def __init__(self, *args, damping_mode: str = "exact", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if damping_mode not in ("exact", "factored"):
            raise ValueError(f"damping_mode must be 'exact' or 'factored', got {damping_mode!r}")
        self.damping_mode = damping_mode
        self.Q_A: Tensor | None = None
        self.alpha: Tensor | None = None
        self.Q_G: Tensor | None = None
        self.gamma: Tensor | None = None
        self.pi: float = 1.0

    @property
    def ready(self) -> bool:
        return self.Q_A is not None

    def refresh(self, curvature: Curvature, damping: float) -> None:
        A, G = curvature.factors()
        alpha, Q_A, gamma, Q_G = kronecker_eigenbases(A, G)
        self.pi = factored_damping_pi(A, G)
        self.alpha, self.Q_A, self.gamma, self.Q_G = alpha, Q_A, gamma, Q_G

    def scale(self, damping: float) -> Tensor:
        """The diagonal (``(d_out, d_in')``) that :meth:`apply` divides by."""
        if self.damping_mode == "exact":
            return self.gamma.outer(self.alpha) + damping
        root = math.sqrt(damping)
        return (self.gamma + root / self.pi).outer(self.alpha + self.pi * root)

    def apply(self, grad: Tensor, damping: float) -> Tensor:
        return eigen_precondition(self.Q_G, grad, self.Q_A, self.scale(damping))

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """``A ⊗ G + λI`` (exact) or ``A_d ⊗ G_d`` (factored) from the current factors."""
        A, G = curvature.factors()
        eye_A, eye_G = eye_like(A), eye_like(G)
        if self.damping_mode == "exact":
            return torch.kron(A, G) + damping * torch.kron(eye_A, eye_G)
        pi, root = factored_damping_pi(A, G), math.sqrt(damping)
        return torch.kron(A + pi * root * eye_A, G + root / pi * eye_G)
