"""K-FAC's Kronecker factors ``A`` and ``G`` as running averages (docs/math.md §1–§2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..capture import LayerStats
from ..linalg import all_finite, gram, input_factor, output_factor
from .base import Curvature, check_finite

__all__ = ["KroneckerFactors", "ThinnedKroneckerFactors", "kronecker_factors", "thin_positions"]


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


def thin_positions(stats: LayerStats, positions: int, generator: torch.Generator) -> LayerStats:
    """The rows of ``positions`` of each sample's ``P`` positions, drawn uniformly without
    replacement (the same positions for ``a`` and ``g``), ``ā`` scaled by ``sqrt(P/s)``:
    ``(M, P, ·)`` → ``(M, s, ·)`` with ``s = min(positions, P)``.

    Both factors stay unbiased: ``A = (1/M) Σ_i Σ_t ā āᵀ`` sums over positions (hence
    the scale) and ``G = (1/(M|T|)) Σ_i Σ_t g gᵀ`` averages over them (the ``M·s`` rows).
    """
    m, p = stats.a.shape[:2]
    s = min(positions, p)
    if s == p:
        return stats
    index = torch.rand(m, p, generator=generator).argsort(dim=1)[:, :s].to(stats.a.device)

    def pick(rows: Tensor) -> Tensor:
        return torch.gather(rows, 1, index.unsqueeze(-1).expand(m, s, rows.shape[-1]))

    return LayerStats(pick(stats.a).mul_(math.sqrt(p / s)), pick(stats.g))


class ThinnedKroneckerFactors(KroneckerFactors):
    """:class:`KroneckerFactors` from at most ``positions`` output positions per sample
    (:func:`thin_positions`; the Spatial Subsampling of Tang et al. 2021 applied to
    K-FAC's running factors): a convolution's ``(M·P) × d_in'`` Gram costs ``s/P`` of
    the full one. Layers with fewer positions (``nn.Linear``: ``P = 1``) are unchanged.

    The positions of update ``k`` are drawn from a private generator seeded with ``k``
    (:attr:`draws` is state): the global RNG is never touched and resume is exact.
    """

    _state_keys = ("A", "G", "draws")

    def __init__(self, *args, positions: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.positions = positions
        self.draws = 0

    def update(self, stats: LayerStats, decay: float) -> None:
        generator = torch.Generator().manual_seed(self.draws)
        super().update(thin_positions(stats, self.positions, generator), decay)
        self.draws += 1


def kronecker_factors(shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                      positions: int | None = None) -> KroneckerFactors:
    """A layer's running ``A`` and ``G``: from every output position (``positions=None``)
    or from at most ``positions`` of them per sample (:class:`ThinnedKroneckerFactors`;
    ``config.statistics_positions`` of K-FAC and EKFAC)."""
    if positions is None:
        return KroneckerFactors(shape, dtype, device)
    return ThinnedKroneckerFactors(shape, dtype, device, positions=positions)
