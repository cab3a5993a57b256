"""How a preconditioner's statistics and work are shared between processes.

The preconditioner asks its sharing strategy at the four points where data-parallel
training differs from one process (docs/distributed.md). Every call receives the
:class:`~natgrad.block.LayerBlock` s it concerns and returns its result; a strategy never
calls back into the preconditioner.

* :meth:`Sharing.curvature_update` — the function that folds a layer's rows into its
  curvature;
* :meth:`Sharing.observation` — the function that folds them into an inverse's own
  statistics (EKFAC's ``S``);
* :meth:`Sharing.refresh` — who recomputes which inverse, and what is sent afterwards;
* :meth:`Sharing.precondition` — who computes which ``Δ``.

:class:`Local` (one process: nothing is shared) is used when a preconditioner gets
``distributed=None``; :class:`natgrad.distributed.DataParallel` is the data-parallel one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from .block import LayerBlock
    from .capture import LayerStats
    from .curvature import Curvature
    from .inverses import InverseStrategy

__all__ = ["Local", "Sharing", "precondition_blocks"]


def precondition_blocks(
    blocks: Mapping[str, LayerBlock],
    grads: Mapping[str, Tensor],
    dampings: Mapping[str, float],
    scales: Mapping[str, float],
) -> dict[str, Tensor]:
    """``Δ_l`` = :meth:`LayerBlock.apply` of every layer in ``grads``, here."""
    return {n: blocks[n].apply(g, dampings[n], scales[n]) for n, g in grads.items()}


class Sharing(Protocol):
    """What a preconditioner asks of its sharing strategy."""

    def bind(self, method: str, blocks: Mapping[str, LayerBlock]) -> None:
        """Called once by the preconditioner's constructor (``method``: its class name)."""

    def curvature_update(self, curvature: Curvature) -> Callable[[LayerStats, float], None]:
        """The function that folds one batch into ``curvature``."""

    def observation(self, inverse: InverseStrategy) -> Callable[[LayerStats, float], None]:
        """The function that folds one batch into ``inverse``'s own statistics."""

    def refresh(self, blocks: Mapping[str, LayerBlock], dampings: Mapping[str, float]) -> None:
        """Refresh the inverses (:meth:`LayerBlock.refresh`), each at its ``λ_l``."""

    def precondition(
        self,
        blocks: Mapping[str, LayerBlock],
        grads: Mapping[str, Tensor],
        dampings: Mapping[str, float],
        scales: Mapping[str, float],
    ) -> dict[str, Tensor]:
        """``Δ`` of every layer in ``grads`` (:meth:`LayerBlock.apply`)."""


class Local:
    """One process: every layer's statistics, inverse and ``Δ`` are computed here."""

    def bind(self, method: str, blocks: Mapping[str, LayerBlock]) -> None:
        """Nothing to agree on with anyone."""

    def curvature_update(self, curvature: Curvature) -> Callable[[LayerStats, float], None]:
        return curvature.update

    def observation(self, inverse: InverseStrategy) -> Callable[[LayerStats, float], None]:
        return inverse.observe

    def refresh(self, blocks: Mapping[str, LayerBlock], dampings: Mapping[str, float]) -> None:
        for name, block in blocks.items():
            block.refresh(dampings[name])

    def precondition(
        self,
        blocks: Mapping[str, LayerBlock],
        grads: Mapping[str, Tensor],
        dampings: Mapping[str, float],
        scales: Mapping[str, float],
    ) -> dict[str, Tensor]:
        return precondition_blocks(blocks, grads, dampings, scales)
