"""K-FAC's Kronecker factors ``A`` and ``G`` as running averages (docs/math.md §1–§2)."""

from __future__ import annotations

from torch import Tensor

from ..capture import LayerStats
from ..linalg import all_finite, gram, input_factor, output_factor
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
        if self.A is None or decay == 0.0:
            A, G = input_factor(stats.a), output_factor(stats.g)
            check_finite(A, G)
        else:
            # ε X + (1−ε) X_batch in one product per factor (no X_batch, no second copy).
            a = stats.a.reshape(-1, stats.a.shape[-1])
            g = stats.g.reshape(-1, stats.g.shape[-1])
            keep = 1.0 - decay
            A = gram(a, keep / stats.batch_size, acc=self.A, beta=decay)
            G = gram(g, keep / g.shape[0], acc=self.G, beta=decay)
            if not (all_finite(A) and all_finite(G)):
                # Rare: a non-finite batch (raise, state untouched) or an already
                # non-finite state (kept as the formula gives it); only the batch tells.
                check_finite(input_factor(stats.a), output_factor(stats.g))
        self.A, self.G = A, G

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.A, self.G
