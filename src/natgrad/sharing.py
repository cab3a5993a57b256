"""How a preconditioner's statistics and work are shared between processes.

The preconditioner asks its sharing object at the four points where data-parallel
training differs from one process (docs/distributed.md):

* :meth:`curvature_update` — the function that folds a layer's rows into its curvature;
* :meth:`observation` — the function that folds them into an inverse's own statistics
  (EKFAC's ``S``);
* :meth:`refresh` — who recomputes which inverse, and what is sent afterwards;
* :meth:`precondition` — who computes which ``Δ``.

:class:`Local` (one process: nothing is shared) is used when a preconditioner gets
``distributed=None``; :class:`natgrad.distributed.DataParallel` is the data-parallel one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .capture import LayerStats
    from .curvature import Curvature
    from .inverses import InverseStrategy
    from .preconditioner import Preconditioner

__all__ = ["Local"]


class Local:
    """One process: every layer's statistics, inverse and ``Δ`` are computed here."""

    def bind(self, pre: Preconditioner) -> None:
        """Nothing to agree on with anyone."""

    def curvature_update(self, curvature: Curvature) -> Callable[[LayerStats, float], None]:
        return curvature.update

    def observation(self, inverse: InverseStrategy) -> Callable[[LayerStats, float], None]:
        return inverse.observe

    def refresh(self, pre: Preconditioner, dampings: Mapping[str, float]) -> None:
        for name, layer in pre.layers.items():
            pre._refresh(name, layer, dampings[name])

    def precondition(
        self, pre: Preconditioner, grads: Mapping[str, Tensor], dampings: Mapping[str, float]
    ) -> dict[str, Tensor]:
        return pre.precondition(grads, dampings)
