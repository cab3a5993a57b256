"""How a method *applies* the inverse of its curvature estimate to a gradient matrix."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..capture import LayerStats
from ..curvature import Curvature
from ..state import Stateful

if TYPE_CHECKING:
    from ..collective import Collective

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
    #: Whether :meth:`refresh` depends on the damping. If it does, a failed refresh is
    #: retried with more damping; a decomposition of the undamped factors (the eigen
    #: forms) would only fail again.
    damping_in_refresh: bool = True

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

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """The damped block this strategy inverts, as a dense ``(d_out·d_in')²`` matrix
        acting on the column-stacked ``vec(∇W̄)`` (``A ⊗ G`` is K-FAC's undamped block), so
        that ``vec(apply(∇W̄, λ)) = dense(curvature, λ)⁻¹ vec(∇W̄)``. For tests and
        studies on small layers only (the whole Kronecker product is formed)."""
        raise NotImplementedError(f"{type(self).__name__} has no dense form")

    # ------------------------------------------------------------------ data parallelism
    def refresh_cost(self, shape: tuple[int, int]) -> float:
        """Estimated cost of one :meth:`refresh` for a layer of ``shape`` ``(d_out, d_in')``,
        used to balance which worker refreshes which layer (default ``d_out³ + d_in'³``,
        two ``O(n³)`` decompositions)."""
        d_out, d_in = shape
        return float(d_out) ** 3 + float(d_in) ** 3

    def broadcast_keys(self) -> tuple[str, ...]:
        """State names the owner broadcasts after :meth:`refresh`, so that every worker can
        :meth:`apply` (default: every name in ``_state_keys``)."""
        return self._state_keys

    def observed_keys(self) -> tuple[str, ...]:
        """State names :meth:`observe` folds batch rows into; :meth:`observe_across`
        averages them over workers (default: every name in ``_state_keys``, which is
        correct but sends more than needed; EKFAC's re-scaling names only ``S``)."""
        return self._state_keys

    def observe_across(self, stats: LayerStats, decay: float, comm: Collective) -> None:
        """:meth:`observe` for a global batch split over data-parallel workers: observe this
        worker's rows, then the mean over workers (weighted by batch size) of
        :meth:`observed_keys` — exact for sample-mean statistics such as EKFAC's ``S``."""
        comm.agree(self, self.observe, stats, decay)
        comm.weighted_mean_(self, self.observed_keys(), stats.batch_size)
