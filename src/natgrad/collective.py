"""What per-layer objects may ask of the data-parallel group: a small protocol.

Curvature estimates and inverse strategies combine their statistics over workers in
``update_across`` / ``observe_across`` through an object with these methods. They depend
on this protocol only; :class:`natgrad.distributed.Collective` (``torch.distributed``) is
the implementation, so the library core never imports the distributed package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import Tensor

__all__ = ["Collective", "Value"]

#: A state value that can travel: a tensor, a number, a flag, or ``None``.
Value = Tensor | float | int | bool | None


class Collective(Protocol):
    """The collectives a curvature or inverse strategy uses (every worker calls each one,
    in the same order)."""

    rank: int
    world_size: int

    def agree(self, target: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` here; if it raised
        :class:`~natgrad.errors.NonFiniteStatistics` on any worker, restore ``target``
        (a :class:`~natgrad.state.Stateful` or ``None``) everywhere and raise it everywhere."""

    def weighted_mean(self, values: Sequence[Value], weight: float) -> list[Value]:
        """``Σ_w weight_w · x_w / Σ_w weight_w`` of each value, over workers."""

    def weighted_mean_(self, target: object, keys: Sequence[str], weight: float) -> None:
        """:meth:`weighted_mean` of the attributes ``keys`` of ``target``, written back."""

    def batch_sizes(self, size: int) -> list[int]:
        """Every worker's ``size``, in rank order."""

    def all_gather_rows(self, rows: Tensor) -> Tensor:
        """Every worker's ``rows`` ``(m_w, ...)`` stacked along dim 0 in rank order."""
