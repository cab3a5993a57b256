"""K-FAC's Kronecker factors ``A`` and ``G`` as running averages (MATH.md, K-FAC)."""

from __future__ import annotations

from torch import Tensor

from ..capture import LayerStats
from ..linalg import input_factor, output_factor, running_average
from .base import Curvature, check_finite

__all__ = ["KroneckerFactors"]


class KroneckerFactors(Curvature):
    """Running ``A`` (``(d_in', d_in')``) and ``G`` (``(d_out, d_out)``), block ``≈ A ⊗ G``.

    ``A = (1/M) Σ_i Σ_t ā ā ᵀ`` and ``G = (1/(M|T|)) Σ_i Σ_t g gᵀ`` per batch, averaged with
    ``X ← ε X + (1−ε) X_batch`` (the first batch is taken as is).
    """

    _state_keys = ("A", "G")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.A: Tensor | None = None
        self.G: Tensor | None = None

    @property
    def initialized(self) -> bool:
        return self.A is not None

    def update(self, stats: LayerStats, decay: float) -> None:
        stats = stats.to(self.dtype)
        A_batch, G_batch = input_factor(stats.a), output_factor(stats.g)
        check_finite(A_batch, G_batch)
        self.A = running_average(self.A, A_batch, decay)
        self.G = running_average(self.G, G_batch, decay)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.A, self.G
