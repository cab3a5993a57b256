"""TKFAC's trace-restricted factors ``F_l ≈ δ·Φ ⊗ Ψ`` (docs/math.md §4).

Gao et al. 2021 (TKFAC, AAAI; arXiv 2011.10741), as eqs. 2.8–2.9 of Gao et al. 2020: per sample
``Λ_i = Σ_t ā_{i,t} ā_{i,t}ᵀ`` and ``Γ_i = (1/|T|) Σ_t g_{i,t} g_{i,t}ᵀ`` (KFC's per-position
sums, so that ``E[Λ] = A`` and ``E[Γ] = G`` of K-FAC; for Linear ``|T| = 1``), and

    δ = E[tr Λ · tr Γ],    Φ = E[tr Γ · Λ] / δ,    Ψ = E[tr Λ · Γ] / δ,

so ``tr Φ = tr Ψ = 1`` and ``tr(δ Φ⊗Ψ) = δ``. For Linear ``δ = E[‖ā‖²‖g‖²] = tr F_l``
exactly; for Conv2d it equals ``tr F_l`` only under KFC's independence assumptions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..capture import LayerStats
from ..linalg import running_average
from .base import Curvature, check_finite

__all__ = ["TraceRestrictedFactors", "trace_restricted_batch"]


def trace_restricted_batch(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One batch's ``(δ, Φ, Ψ)``: a 0-d tensor, ``(d_in', d_in')``, ``(d_out, d_out)``.

    ``a`` is ``(M, P, d_in')``, ``g`` ``(M, P, d_out)`` (per-sample ``g_i``). When ``δ = 0``
    (every per-sample gradient is zero) the block ``δ Φ⊗Ψ`` is zero whatever ``Φ``, ``Ψ``;
    they are then ``I/dim`` so that ``tr Φ = tr Ψ = 1`` still holds.
    """
    m, p = a.shape[0], a.shape[1]
    tr_lambda = a.square().sum(dim=(1, 2))  # (M,)  tr Λ_i
    tr_gamma = g.square().sum(dim=(1, 2)) / p  # (M,)  tr Γ_i
    delta = torch.dot(tr_lambda, tr_gamma) / m
    if delta.item() <= 0:
        eye_a = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        eye_g = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
        return delta, eye_a / a.shape[-1], eye_g / g.shape[-1]
    # E[w_i Λ_i] as one Gram matrix of rows scaled by sqrt(w_i).
    a_w = (a * tr_gamma.sqrt().view(m, 1, 1)).reshape(-1, a.shape[-1])
    g_w = (g * tr_lambda.sqrt().view(m, 1, 1)).reshape(-1, g.shape[-1])
    Phi = a_w.T @ a_w / (m * delta)
    Psi = g_w.T @ g_w / (m * p * delta)
    return delta, Phi, Psi


class TraceRestrictedFactors(Curvature):
    """Running ``δ`` (a number), ``Φ`` ``(d_in', d_in')`` and ``Ψ`` ``(d_out, d_out)``.

    Each is a running average ``X ← ε X + (1−ε) X_batch`` of :func:`trace_restricted_batch`
    (first batch as is). Averages of trace-1 matrices keep trace 1.

    :meth:`factors` returns ``(sqrt(δ)·Φ, sqrt(δ)·Ψ)``: the block is ``≈ A ⊗ G`` with the
    scale ``δ`` split evenly, so K-FAC's inverse with an even damping split
    (``FactoredInverse(pi=unit_pi)``) gives exactly TKFAC's
    ``Φ̂ = sqrt(δ)Φ + sqrt(λ)I``, ``Ψ̂ = sqrt(δ)Ψ + sqrt(λ)I``, and the eigenbasis of these
    factors is TEKFAC's ``Q_Φ``, ``Q_Ψ``.
    """

    _state_keys = ("delta", "Phi", "Psi")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delta: float | None = None
        self.Phi: Tensor | None = None
        self.Psi: Tensor | None = None

    @property
    def initialized(self) -> bool:
        return self.Phi is not None

    def update(self, stats: LayerStats, decay: float) -> None:
        stats = stats.to(self.dtype)
        delta, Phi, Psi = trace_restricted_batch(stats.a, stats.g)
        check_finite(delta, Phi, Psi)
        delta = delta.item()
        self.delta = delta if self.delta is None else decay * self.delta + (1 - decay) * delta
        self.Phi = running_average(self.Phi, Phi, decay)
        self.Psi = running_average(self.Psi, Psi, decay)

    def update_across(self, stats: LayerStats, decay: float, comm) -> None:
        """:meth:`update` for a batch split over data-parallel workers (docs/distributed.md).

        ``Φ`` and ``Ψ`` are ratios of sample means, so averaging them would be wrong when
        the workers' ``δ_w`` differ; ``δ``, ``δ·Φ = E[tr Γ·Λ]`` and ``δ·Ψ = E[tr Λ·Γ]`` are
        sample means: they are averaged (weighted by batch size), then divided.
        """

        def local() -> tuple[Tensor, Tensor, Tensor]:
            rows = stats.to(self.dtype)
            delta, Phi, Psi = trace_restricted_batch(rows.a, rows.g)
            check_finite(delta, Phi, Psi)
            return delta, delta * Phi, delta * Psi

        delta, delta_Phi, delta_Psi = comm.weighted_mean(comm.agree(None, local), stats.batch_size)
        if delta.item() > 0:
            Phi, Psi = delta_Phi / delta, delta_Psi / delta
        else:  # every per-sample gradient is zero: as trace_restricted_batch
            Phi = torch.eye(self.shape[1], dtype=self.dtype, device=self.device) / self.shape[1]
            Psi = torch.eye(self.shape[0], dtype=self.dtype, device=self.device) / self.shape[0]
        delta = delta.item()
        self.delta = delta if self.delta is None else decay * self.delta + (1 - decay) * delta
        self.Phi = running_average(self.Phi, Phi, decay)
        self.Psi = running_average(self.Psi, Psi, decay)

    def trace(self) -> float:
        """``tr(δ Φ⊗Ψ) = δ · tr Φ · tr Ψ`` (``= δ`` up to rounding)."""
        return self.delta * torch.trace(self.Phi).item() * torch.trace(self.Psi).item()

    def factors(self) -> tuple[Tensor, Tensor]:
        root = math.sqrt(self.delta)
        return root * self.Phi, root * self.Psi
