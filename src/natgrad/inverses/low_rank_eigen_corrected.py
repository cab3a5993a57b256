"""The eigenvalue-corrected inverse (EKFAC, TEKFAC) with a wide input factor kept as its
top eigenvectors plus one isotropic rest (docs/math.md §3, "Wide input factors").

For an input factor ``A`` ``(n, n)`` too wide for an ``n³`` eigendecomposition at every
refresh, only its top-``k`` eigenvectors ``U`` ``(n, k)`` are found (warm-started subspace
iteration, as K-FAC's :class:`~natgrad.inverses.LowRankFactoredInverse`); the complement
``P = I − UUᵀ`` is one subspace in which every direction gets the same re-scaling. The
basis is ``[U, U_⊥] ⊗ Q_G`` with ``U_⊥`` any orthonormal basis of the complement (it is
never formed), and the re-scaling has ``S_k`` ``(d_out, k)`` on ``U``'s columns and
``s_⊥`` ``(d_out,)`` — one value per output direction — on the complement:

    S_k = (1/M) Σ_i (Q_Gᵀ ∇W̄_i U)^{⊙2}
    s_⊥[r] = (1/(M(n−k))) Σ_i ‖(Q_Gᵀ ∇W̄_i P)[r, :]‖²

so ``Σ S_k + (n−k) Σ s_⊥`` is the trace that EKFAC's full ``S`` would have. With
``W' = Q_Gᵀ V`` and ``C = W'U``:

    Δ = Q_G [ (C ⊘ (S_k+λ)) Uᵀ + (W' − C Uᵀ) ⊘ (s_⊥+λ) ]

in ``2·d_out²·n + 2·d_out·n·k`` instead of EKFAC's ``2·d_out²·n + 2·d_out·n²``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import LayerStats
from ..curvature import Curvature
from ..linalg import symmetric_eigh
from ..persample import basis_second_moment, complement_second_moment
from .eigen_corrected import RescaledBasisInverse
from .low_rank import check_subspace_arguments, trace_residual, warm_top_eigenpairs

__all__ = ["LowRankEigenCorrectedInverse"]


class LowRankEigenCorrectedInverse(RescaledBasisInverse):
    """:class:`~natgrad.inverses.EigenCorrectedInverse` for a layer whose input factor is
    wide (module docstring); the output side keeps its full eigenbasis ``Q_G``.

    * :meth:`refresh`: ``U``, ``Λ`` = top-``k`` eigenpairs of the input factor (from the
      previous ``U`` after the first refresh), ``r`` = the mean of its other eigenvalues
      (:func:`~natgrad.inverses.low_rank.trace_residual`), ``γ``, ``Q_G`` = the output
      factor's eigendecomposition; the re-scaling restarts at the factors' own eigenvalues
      ``S_k = γ Λᵀ``, ``s_⊥ = γ·r``.
    * :meth:`observe`: the batch's ``S_k`` and ``s_⊥``
      (:func:`~natgrad.persample.basis_second_moment` on ``U``,
      :func:`~natgrad.persample.complement_second_moment`), folded in as EKFAC's ``S``.
    * :meth:`apply`: the module docstring's ``Δ``.

    Args:
        shape: the layer's ``(d_out, d_in')``; ``d_in' > rank`` is required.
        rank: ``k`` (>= 1), eigenvectors kept of the input factor.
        oversample, iterations, warm_iterations: as
            :class:`~natgrad.inverses.LowRankFactoredInverse`'s.
        observe_every, scale_rule: as :class:`~natgrad.inverses.EigenCorrectedInverse`'s.

    Attributes:
        U: ``(d_in', k)`` top eigenvectors of the input factor; ``Q_G``: ``(d_out, d_out)``.
        S_k: ``(d_out, k)`` re-scaling on ``U ⊗ Q_G``.
        s_perp: ``(d_out,)`` re-scaling of each output direction on the complement of ``U``.
    """

    _state_keys = ("U", "Q_G", "S_k", "s_perp", "fresh_basis")
    _scale_keys = ("S_k", "s_perp")

    def __init__(
        self,
        *args,
        shape: tuple[int, int],
        rank: int,
        oversample: int = 16,
        iterations: int = 3,
        warm_iterations: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_subspace_arguments(
            rank=rank, oversample=oversample, iterations=iterations, warm_iterations=warm_iterations
        )
        if shape[1] <= rank:
            raise ValueError(f"rank must be below the input width {shape[1]}, got {rank!r}")
        self.rank, self.oversample = rank, oversample
        self.iterations, self.warm_iterations = iterations, warm_iterations
        self.U: Tensor | None = None
        self.Q_G: Tensor | None = None
        self.S_k: Tensor | None = None
        self.s_perp: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.U is not None

    def refresh(self, curvature: Curvature, damping: float) -> None:
        A, G = curvature.factors()
        # Everything is computed before anything is stored: a failure changes nothing.
        values, U = warm_top_eigenpairs(
            A,
            self.rank,
            self.U,
            oversample=self.oversample,
            iterations=self.iterations,
            warm_iterations=self.warm_iterations,
        )
        rest = trace_residual(A, values)
        gamma, Q_G = symmetric_eigh(G)
        self.U, self.Q_G = U, Q_G
        self.S_k, self.s_perp = gamma.outer(values), gamma * rest
        self.fresh_basis = True

    def batch_scale(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        return (
            basis_second_moment(stats.a, stats.g, self.U, self.Q_G),
            complement_second_moment(stats.a, stats.g, self.U, self.Q_G),
        )

    def trace(self) -> float:
        """``Σ S_k + (d_in' − k)·Σ s_⊥``: the trace of the approximate block."""
        rest = self.U.shape[0] - self.U.shape[1]
        return (self.S_k.sum() + rest * self.s_perp.sum()).item()

    def apply(self, grad: Tensor, damping: float) -> Tensor:
        rotated = self.Q_G.T @ grad  # W' (d_out, d_in')
        C = rotated @ self.U  # (d_out, k)
        rest = (self.s_perp + damping).reciprocal()[:, None]
        # W'/(s_⊥+λ) + (C ⊘ (S_k+λ) − C/(s_⊥+λ)) Uᵀ: the complement part W' − CUᵀ is
        # never formed on its own.
        coeff = C / (self.S_k + damping) - C * rest
        return self.Q_G @ torch.addmm(rotated * rest, coeff, self.U.T)

    def refresh_cost(self, shape: tuple[int, int]) -> float:
        """``d_out³`` (the output factor's eigendecomposition) plus the products of a
        warm-started subspace iteration, ``(warm_iterations + 1)·n²·p``."""
        d_out, n = shape
        p = min(self.rank + self.oversample, n)
        return float(d_out) ** 3 + (self.warm_iterations + 1) * float(n) ** 2 * p

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """``(Q̃_A⊗Q_G) diag(vec(S̃) + λ) (Q̃_A⊗Q_G)ᵀ`` with ``Q̃_A = [U, U_⊥]`` (``U_⊥``
        from a complete QR of ``U``) and ``S̃ = [S_k, s_⊥ repeated n − k times]``, from
        the stored basis and re-scaling (tests and studies on small layers only)."""
        n, k = self.U.shape
        U_perp = torch.linalg.qr(self.U, mode="complete").Q[:, k:]
        Q_A = torch.cat([self.U, U_perp], dim=1)
        S = torch.cat([self.S_k, self.s_perp[:, None].expand(-1, n - k)], dim=1)
        K = torch.kron(Q_A, self.Q_G.contiguous())
        return K @ torch.diag(S.T.reshape(-1) + damping) @ K.T
