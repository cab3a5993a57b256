"""Which worker computes which layer's inverse: a cost-balanced, static work assignment.

Every ``T_inv`` steps each layer's inverse strategy does its expensive work (Cholesky
inverses, eigendecompositions, Woodbury kernels: ``O(d³)`` per factor). Under data
parallelism each layer's work is done once, by its *owner*, and shared (docs/distributed.md).
The assignment is a pure function of the layers' names and estimated costs, so every
worker computes the same one without communicating.

Balancing is the longest-processing-time-first rule (Graham 1969): layers in decreasing
cost, each to the currently least-loaded worker (ties: lowest rank, then layer name). Its
largest load is at most ``4/3 − 1/(3W)`` times the best possible one, and never more than
the mean load plus the largest single cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["WorkAssignment", "balance", "cubic_cost"]


def cubic_cost(shape: tuple[int, int]) -> float:
    """``d_out³ + d_in'³``: the flops order of decomposing a layer's two factors."""
    d_out, d_in = shape
    return float(d_out) ** 3 + float(d_in) ** 3


@dataclass(frozen=True)
class WorkAssignment:
    """Owner rank of each layer.

    Attributes:
        owners: layer name → owning rank in ``[0, world_size)``.
        costs: layer name → estimated cost of its inverse work.
        world_size: number of workers.
    """

    owners: Mapping[str, int]
    costs: Mapping[str, float]
    world_size: int

    def __post_init__(self) -> None:
        if set(self.owners) != set(self.costs):
            raise ValueError(
                f"owners and costs must name the same layers: only in owners "
                f"{sorted(set(self.owners) - set(self.costs))}, only in costs "
                f"{sorted(set(self.costs) - set(self.owners))}"
            )
        for name, rank in self.owners.items():
            if not (isinstance(rank, int) and 0 <= rank < self.world_size):
                raise ValueError(
                    f"owner of {name!r} must be a rank in [0, {self.world_size}), got {rank!r}"
                )

    def owner(self, name: str) -> int:
        """The rank that computes layer ``name``'s inverse."""
        try:
            return self.owners[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not an assigned layer; layers: {sorted(self.owners)}"
            ) from None

    def layers_of(self, rank: int) -> list[str]:
        """The layers ``rank`` owns, in the order of :attr:`owners`."""
        return [name for name, r in self.owners.items() if r == rank]

    def loads(self) -> list[float]:
        """Total estimated cost per rank."""
        out = [0.0] * self.world_size
        for name, rank in self.owners.items():
            out[rank] += self.costs[name]
        return out

    def imbalance(self) -> float:
        """``max load / mean load`` (1.0 is perfect balance; 1.0 when there is no work)."""
        loads = self.loads()
        mean = sum(loads) / self.world_size
        return max(loads) / mean if mean > 0 else 1.0


def balance(costs: Mapping[str, float], world_size: int) -> WorkAssignment:
    """Assign each layer to one of ``world_size`` workers, balancing the total cost.

    Args:
        costs: layer name → estimated cost (finite, >= 0), e.g. :func:`cubic_cost` of its
            shape. The order of the mapping does not affect the result.
        world_size: number of workers (>= 1).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    for name, cost in costs.items():
        if (
            isinstance(cost, bool)
            or not isinstance(cost, (int, float))
            or not (math.isfinite(cost) and cost >= 0)
        ):
            raise ValueError(f"cost of layer {name!r} must be a finite number >= 0, got {cost!r}")
    loads = [0.0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    ordered = {name: owners[name] for name in costs}
    return WorkAssignment(ordered, {n: float(c) for n, c in costs.items()}, world_size)
