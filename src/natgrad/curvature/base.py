"""What a method *estimates* for one layer: the curvature block's running statistics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..capture import LayerStats
from ..errors import NonFiniteStatistics
from ..state import Stateful

if TYPE_CHECKING:
    from ..collective import Collective

__all__ = ["Curvature", "NonFiniteStatistics"]


class Curvature(Stateful, ABC):
    """A running estimate of one layer's Fisher block.

    Args:
        shape: ``(d_out, d_in')`` of the layer's gradient matrix ``∇W̄``.
        dtype: dtype of the statistics (float32 or wider, whatever the model's dtype).
        device: where the statistics live.

    Subclasses implement :meth:`update` (a running-average step from one batch's rows)
    and :meth:`factors` (the dense Kronecker factors, for introspection).

    What :meth:`update` receives: the rows ``stats.a`` ``(M, P, d_in')`` and ``stats.g``
    ``(M, P, d_out)`` that Kronecker-factored estimates are built from, and, in the step
    that folds them, the layer's gradient matrix ``stats.grad`` ``(d_out, d_in')`` (read
    from ``.grad`` by the layer's handler), for an estimate built from the gradient
    itself: a diagonal ``E[∇W̄ ⊙ ∇W̄]`` or Shampoo's ``∇W̄ ∇W̄ᵀ``, ``∇W̄ᵀ ∇W̄``.
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

        ``stats``: the batch's rows and, when the preconditioner folds them in a step,
        ``stats.grad``, the gradient matrix ``∇W̄`` ``(d_out, d_in')`` (``None`` when only
        rows are given). Must leave the estimate untouched and raise
        :class:`NonFiniteStatistics` if the batch statistics are not finite.
        """

    @abstractmethod
    def factors(self) -> tuple[Tensor, Tensor]:
        """The current factors ``(A, G)`` as dense tensors, ``(d_in', d_in')`` and
        ``(d_out, d_out)``, in docs/math.md §1's convention (the block is ``≈ A ⊗ G``)."""

    def batch_rows(self) -> tuple[Tensor | None, Tensor | None] | None:
        """``(Y_A, Y_G)`` ``(m, d_in')``, ``(m, d_out)`` when the estimate is kept as batch
        matrices with ``A = Y_AᵀY_A/m``, ``G = Y_GᵀY_G/m`` (what a Woodbury inverse needs);
        ``None`` (default) for estimates kept as dense factors. A side that such an estimate
        holds as a dense factor instead is ``None`` in the pair (:meth:`dense_factors`)."""
        return None

    def dense_factors(self) -> tuple[Tensor | None, Tensor | None]:
        """For a batch-matrix estimate, the sides held as dense ``n × n`` factors rather
        than rows (SKFAC's Algorithm 2 exact branch, docs/math.md §7); ``(None, None)``
        (default) when every side is rows."""
        return None, None

    # ------------------------------------------------------------------ data parallelism
    def averaged_keys(self) -> tuple[str, ...]:
        """State names :meth:`update_across` averages over workers (default: every name in
        ``_state_keys``; only floating tensors and floats are averaged, flags and ``None``
        are left as they are)."""
        return self._state_keys

    def update_across(self, stats: LayerStats, decay: float, comm: Collective) -> None:
        """:meth:`update` for a global batch split over data-parallel workers
        (docs/distributed.md). Every worker calls it with its own rows; afterwards every
        worker holds the estimate of the global batch.

        Default: :meth:`update` with this worker's rows, then the mean over workers,
        weighted by their batch sizes ``M_w``, of :meth:`averaged_keys`. That is exact when
        the batch estimate is a sample mean and the state its running average (K-FAC's
        ``A``, ``G``): ``Σ_w (M_w/M)(ε X + (1−ε) X_w) = ε X + (1−ε) X_batch``.

        Override it when the batch estimate is not a sample mean — a ratio of sample means
        (TKFAC's ``Φ = E[tr Γ·Λ]/δ``: average ``δ`` and ``δ·Φ``) or per-sample rows
        (SKFAC's ``Y``: gather the rows with ``comm.all_gather_rows``, ``m`` grows with
        the world size). Every worker must reach the same collectives: run what can fail
        on one worker through ``comm.agree``.
        """
        comm.agree(self, self.update, stats, decay)
        comm.weighted_mean_(self, self.averaged_keys(), stats.batch_size)


def check_finite(*tensors: Tensor) -> None:
    """Raise :class:`NonFiniteStatistics` unless every tensor is finite."""
    for t in tensors:
        if not torch.isfinite(t).all():
            raise NonFiniteStatistics("batch statistics contain NaN or Inf")
