"""Sherman–Morrison K-FAC's curvature: K-FAC's full running factors until the switch, then
only their diagonals (docs/math.md §8; Liu, Gao & Wang 2021, §2, Table 1).

After the switch the per-batch cost falls from ``O(M·n²)`` (a Gram matrix) to ``O(M·n)``:
``diag A_batch = (1/M) Σ_i Σ_t ā_{i,t}^{⊙2}``, ``diag G_batch = (1/(M|T|)) Σ_i Σ_t g_{i,t}^{⊙2}``,
averaged with the same ``X ← ε X + (1−ε) X_batch``. At the switch the running diagonals
start from the diagonals of the running full factors, so they continue exactly the
diagonal of the full average that is no longer formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import LayerStats
from ..linalg import input_factor, output_factor, running_average
from .base import Curvature, check_finite

__all__ = ["DiagonalSwitchFactors", "input_diagonal", "output_diagonal"]


def input_diagonal(a: Tensor) -> Tensor:
    """``diag A = (1/M) Σ_i Σ_t ā_{i,t}^{⊙2}`` from rows ``(M, P, d_in')``: ``(d_in',)``."""
    return a.square().sum(dim=(0, 1)).div_(a.shape[0])


def output_diagonal(g: Tensor) -> Tensor:
    """``diag G = (1/(M|T|)) Σ_i Σ_t g_{i,t}^{⊙2}`` from rows ``(M, P, d_out)``: ``(d_out,)``."""
    return g.square().sum(dim=(0, 1)).div_(g.shape[0] * g.shape[1])


class DiagonalSwitchFactors(Curvature):
    """K-FAC's running ``A``, ``G`` until :meth:`switch_to_diagonal`, then only
    ``diag A`` (``(d_in',)``) and ``diag G`` (``(d_out,)``); the full factors are dropped.

    Args:
        shape, dtype, device: as :class:`~natgrad.curvature.Curvature`.
        diagonal_only: track only the diagonals from the start (Sherman–Morrison K-FAC
            with ``k = 0``).

    :meth:`factors` gives the dense ``(A, G)`` before the switch and
    ``(diag(diag A), diag(diag G))`` after it — all that is estimated then.
    """

    _state_keys = ("A", "G", "diag_A", "diag_G", "diagonal_only")

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        diagonal_only: bool = False,
    ) -> None:
        super().__init__(shape, dtype, device)
        self.diagonal_only = bool(diagonal_only)
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.diag_A: Tensor | None = None
        self.diag_G: Tensor | None = None

    @property
    def initialized(self) -> bool:
        return self.A is not None or self.diag_A is not None

    def update(self, stats: LayerStats, decay: float) -> None:
        stats = stats.to(self.dtype)
        if self.diagonal_only:
            d_A, d_G = input_diagonal(stats.a), output_diagonal(stats.g)
            check_finite(d_A, d_G)
            self.diag_A = running_average(self.diag_A, d_A, decay)
            self.diag_G = running_average(self.diag_G, d_G, decay)
            return
        A_batch, G_batch = input_factor(stats.a), output_factor(stats.g)
        check_finite(A_batch, G_batch)
        self.A = running_average(self.A, A_batch, decay)
        self.G = running_average(self.G, G_batch, decay)

    def switch_to_diagonal(self) -> None:
        """From now on accumulate only the diagonals, starting from those of the running
        factors; the full factors are released. Idempotent."""
        if self.diagonal_only:
            return
        if self.A is not None:
            self.diag_A = self.A.diagonal().clone()
            self.diag_G = self.G.diagonal().clone()
        self.A = self.G = None
        self.diagonal_only = True

    def diagonals(self) -> tuple[Tensor, Tensor]:
        """``(diag A, diag G)`` of the current running factors, before or after the switch."""
        if self.diagonal_only:
            return self.diag_A, self.diag_G
        return self.A.diagonal(), self.G.diagonal()

    def factors(self) -> tuple[Tensor, Tensor]:
        if self.diagonal_only:
            return torch.diag(self.diag_A), torch.diag(self.diag_G)
        return self.A, self.G
