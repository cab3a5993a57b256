"""How a method *applies* the inverse of its curvature estimate to a gradient matrix."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..capture import LayerStats
from ..curvature import Curvature
from ..state import Stateful

__all__ = ["InverseStrategy"]


class InverseStrategy(Stateful, ABC):
    """One layer's (approximate) inverse of its curvature block, refreshed every ``T_inv``.

    Args:
        dtype: dtype of the stored inverse (that of the curvature).
        device: where it lives.

    The preconditioner calls, per layer:

    * :meth:`refresh` every ``T_inv`` steps (and at the first step) with the current
      curvature and damping ``λ``. It must either finish or raise
      :class:`~natgrad.linalg.DecompositionError` *without* changing the stored state.
    * :meth:`observe` on the steps listed by :attr:`observe_every` (and right after a
      refresh when the batch's rows are at hand), for strategies that keep statistics
      in their own basis (EKFAC's ``S``). The default does nothing.
    * :meth:`apply` every step, on the gradient matrix ``∇W̄`` ``(d_out, d_in')``.
    """

    #: Steps between calls of :meth:`observe`; ``None`` for strategies that need none.
    observe_every: int | None = None

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether :meth:`refresh` has succeeded at least once."""

    @abstractmethod
    def refresh(self, curvature: Curvature, damping: float) -> None:
        """Recompute the inverse from ``curvature`` with damping ``λ``."""

    def observe(self, stats: LayerStats, decay: float) -> None:  # noqa: B027 - optional hook
        """Fold one batch's rows into basis-specific statistics (optional)."""

    @abstractmethod
    def apply(self, grad: Tensor, damping: float) -> Tensor:
        """The preconditioned direction ``Δ`` for gradient matrix ``grad`` (same shape)."""
