"""What a method *estimates* for one layer: the curvature block's running statistics."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..capture import LayerStats
from ..state import Stateful

__all__ = ["Curvature", "NonFiniteStatistics"]


class NonFiniteStatistics(ArithmeticError):
    """A batch produced NaN/Inf statistics; the running estimate was left unchanged."""


class Curvature(Stateful, ABC):
    """A running estimate of one layer's Fisher block.

    Args:
        shape: ``(d_out, d_in')`` of the layer's gradient matrix ``∇W̄``.
        dtype: dtype of the statistics (float32 or wider, whatever the model's dtype).
        device: where the statistics live.

    Subclasses implement :meth:`update` (a running-average step from one batch's rows)
    and :meth:`factors` (the dense Kronecker factors, for introspection).
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = device

    @property
    @abstractmethod
    def initialized(self) -> bool:
        """Whether at least one batch has been seen."""

    @abstractmethod
    def update(self, stats: LayerStats, decay: float) -> None:
        """Fold one batch into the running estimate (``X ← ε X + (1−ε) X_batch``).

        Must leave the estimate untouched and raise :class:`NonFiniteStatistics` if the
        batch statistics are not finite.
        """

    @abstractmethod
    def factors(self) -> tuple[Tensor, Tensor]:
        """The current factors ``(A, G)`` as dense tensors, ``(d_in', d_in')`` and
        ``(d_out, d_out)``, in MATH.md's convention (the block is ``≈ A ⊗ G``)."""


def check_finite(*tensors: Tensor) -> None:
    """Raise :class:`NonFiniteStatistics` unless every tensor is finite."""
    for t in tensors:
        if not torch.isfinite(t).all():
            raise NonFiniteStatistics("batch statistics contain NaN or Inf")
