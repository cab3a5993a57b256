"""Pure tensor functions: the math of MATH.md, with no state.

These are what the dense-reference tests target. Shapes: ``A`` is ``(d_in', d_in')``,
``G`` is ``(d_out, d_out)``, a gradient matrix ``V`` is ``(d_out, d_in')``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DecompositionError",
    "input_factor",
    "output_factor",
    "running_average",
    "factored_damping_pi",
    "damped_inverse",
    "symmetric_eigh",
    "kron_precondition",
    "eigen_precondition",
    "kl_clip_scale",
]


class DecompositionError(RuntimeError):
    """A Cholesky or eigendecomposition failed or produced non-finite values."""


def input_factor(a: Tensor) -> Tensor:
    """``A = (1/M) Σ_i Σ_t ā_{i,t} ā_{i,t}ᵀ`` from rows ``a`` of shape ``(M, P, d_in')``.

    MATH.md, K-FAC: the sum over positions ``t`` is *not* normalised (KFC's convention).
    """
    flat = a.reshape(-1, a.shape[-1])
    return (flat.T @ flat).div_(a.shape[0])


def output_factor(g: Tensor) -> Tensor:
    """``G = (1/(M|T|)) Σ_i Σ_t g_{i,t} g_{i,t}ᵀ`` from rows ``g`` of shape ``(M, P, d_out)``."""
    flat = g.reshape(-1, g.shape[-1])
    return (flat.T @ flat).div_(flat.shape[0])


def running_average(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """``X ← ε X + (1−ε) X_batch``; the first update (``old is None``) takes ``X_batch``."""
    if old is None:
        return new.clone()
    return old.mul(decay).add_(new, alpha=1.0 - decay)


def factored_damping_pi(A: Tensor, G: Tensor) -> float:
    """``π = sqrt((tr A / dim A) / (tr G / dim G))`` (``000_…`` eq. 4).

    Falls back to ``π = 1`` when either mean eigenvalue is not positive (e.g. a layer whose
    inputs were all zero), so that damping stays finite.
    """
    mean_a = torch.trace(A).item() / A.shape[0]
    mean_g = torch.trace(G).item() / G.shape[0]
    if not (mean_a > 0 and mean_g > 0 and math.isfinite(mean_a) and math.isfinite(mean_g)):
        return 1.0
    return math.sqrt(mean_a / mean_g)


def damped_inverse(X: Tensor, shift: float) -> Tensor:
    """``(X + shift·I)⁻¹`` for symmetric PSD ``X``, by Cholesky.

    Raises:
        DecompositionError: the shifted matrix is not numerically positive definite.
    """
    eye = torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
    L, info = torch.linalg.cholesky_ex(X + shift * eye)
    if info.item() != 0:
        raise DecompositionError(f"Cholesky failed at minor {info.item()} (shift {shift:g})")
    inv = torch.cholesky_inverse(L)
    if not torch.isfinite(inv).all():
        raise DecompositionError("inverse has non-finite entries")
    return inv


def symmetric_eigh(X: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors ``Q`` of symmetric PSD ``X``.

    Raises:
        DecompositionError: the decomposition failed or is not finite.
    """
    try:
        evals, evecs = torch.linalg.eigh(X)
    except RuntimeError as err:  # LAPACK did not converge
        raise DecompositionError(str(err)) from err
    if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
        raise DecompositionError("eigendecomposition has non-finite entries")
    return evals.clamp_min(0.0), evecs


def kron_precondition(G_inv: Tensor, V: Tensor, A_inv: Tensor) -> Tensor:
    """``(A ⊗ G)⁻¹ vec(V) = vec(G⁻¹ V A⁻¹)`` given the two inverses."""
    return G_inv @ V @ A_inv


def eigen_precondition(Q_G: Tensor, V: Tensor, Q_A: Tensor, scale: Tensor) -> Tensor:
    """``Q_G [ (Q_Gᵀ V Q_A) ⊘ scale ] Q_Aᵀ`` — a diagonal inverse in a Kronecker eigenbasis.

    ``scale`` has ``V``'s shape ``(d_out, d_in')``: ``γ αᵀ + λ`` for K-FAC's eigen form,
    ``S + λ`` for EKFAC.
    """
    return Q_G @ ((Q_G.T @ V @ Q_A) / scale) @ Q_A.T


def kl_clip_scale(kl_clip: float, lr: float, vdotg: float) -> float:
    """``ν = min(1, sqrt(κ / (η² Σ_l ⟨Δ_l, ∇W̄_l⟩)))`` (Ba et al. 2017).

    Returns 1 when ``Σ⟨Δ,∇⟩`` is not positive (there is nothing to bound) or ``lr`` is 0.
    """
    if vdotg <= 0 or lr == 0 or not math.isfinite(vdotg):
        return 1.0
    return min(1.0, math.sqrt(kl_clip / (lr * lr * vdotg)))
