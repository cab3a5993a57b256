"""Data-parallel K-FAC: the strategy object a :class:`~natgrad.Preconditioner` is given as
``distributed=``.

The model is wrapped in ``torch.nn.parallel.DistributedDataParallel`` as usual, so every
worker's ``.grad`` is the global batch-mean gradient before :meth:`Preconditioner.step`.
The preconditioner then calls this object (its sharing strategy, natgrad/sharing.py) at
four points of its step:

1. **factor updates** (every ``T_cov``): each layer's curvature folds in this worker's rows
   and is made the global batch's by :meth:`Curvature.update_across` (default: a weighted
   all-reduce of its state) — every worker holds the same factors;
2. **inverse refreshes** (every ``T_inv``): only the owner of a layer
   (:func:`~natgrad.distributed.balance`) refreshes its inverse; with ``share="inverse"``
   the owner then broadcasts :meth:`InverseStrategy.broadcast_keys`, so every worker keeps
   every inverse; with ``share="gradient"`` the inverse stays with its owner;
3. **observations** (every ``T_s``, EKFAC/TEKFAC): each worker folds its rows into the
   re-scaling in the shared basis, averaged by :meth:`InverseStrategy.observe_across`;
4. **after preconditioning** (every step, ``share="gradient"`` only): each owner
   broadcasts its layers' ``Δ``.

``share="inverse"`` trades memory (every worker stores every inverse) for less traffic
(inverses travel once per ``T_inv``); ``share="gradient"`` stores each inverse once and
sends ``Δ`` (the size of the weights) every step. Strategies that keep statistics in
their own basis (EKFAC's ``S``: :attr:`InverseStrategy.observe_every` is set) need that
basis on every worker, so they require ``share="inverse"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor

from ..sharing import precondition_blocks
from .assignment import WorkAssignment, balance
from .comm import Collective

if TYPE_CHECKING:
    from ..block import LayerBlock
    from ..capture import LayerStats
    from ..curvature import Curvature
    from ..inverses import InverseStrategy

__all__ = ["DataParallel", "SHARE_MODES"]

#: What is shared after an owner's refresh: the inverse (every worker keeps every inverse)
#: or the preconditioned gradient (only owners keep inverses).
SHARE_MODES = ("inverse", "gradient")


class DataParallel:
    """Share K-FAC's statistics and work across the workers of a process group.

    Args:
        share: ``"inverse"`` (default) or ``"gradient"``; see the module docstring.
        group: the process group (``None``: the default group).
        cost: layer → estimated refresh cost, used to balance owners (default: each
            layer's ``inverse.refresh_cost(shape)``, ``d_out³ + d_in'³`` unless the
            strategy says otherwise).

    Attributes (after the preconditioner is built):
        comm: the :class:`~natgrad.distributed.Collective` (its ``sent`` counts bytes).
        assignment: the :class:`~natgrad.distributed.WorkAssignment` of layers to ranks.
    """

    def __init__(
        self,
        share: str = "inverse",
        *,
        group: dist.ProcessGroup | None = None,
        cost: Callable[[str, tuple[int, int]], float] | None = None,
    ) -> None:
        if share not in SHARE_MODES:
            raise ValueError(f"share must be one of {SHARE_MODES}, got {share!r}")
        self.share = share
        self.group = group
        self.cost = cost
        self.comm: Collective | None = None
        self.assignment: WorkAssignment | None = None

    # ------------------------------------------------------------------ set-up
    def bind(self, method: str, blocks: Mapping[str, LayerBlock]) -> None:
        """Check the workers agree on the layers, and assign owners (called once by the
        preconditioner's constructor; ``method``: its class name)."""
        if self.comm is not None:
            raise RuntimeError("a DataParallel object serves one preconditioner; make a new one")
        comm = Collective(self.group)
        shapes = {name: block.shape for name, block in blocks.items()}
        everyone = comm.all_gather_object((method, sorted(shapes.items())))
        ours = everyone[comm.rank]
        for rank, theirs in enumerate(everyone):
            if theirs != ours:
                raise ValueError(
                    f"workers disagree on the preconditioner: rank {comm.rank} has {ours}, rank "
                    f"{rank} has {theirs}; build the same model and method on every worker"
                )
        if self.share == "gradient":
            observing = [b.inverse for b in blocks.values() if b.inverse.observe_every is not None]
            if observing:
                raise ValueError(
                    f"share='gradient' cannot serve {method}: its {type(observing[0]).__name__} "
                    "re-fits statistics in its own basis from every worker's rows "
                    f"(observe_every={observing[0].observe_every}), so every "
                    "worker needs the basis; use share='inverse'"
                )
        costs = {
            name: float(
                self.cost(name, shape)
                if self.cost is not None
                else blocks[name].inverse.refresh_cost(shape)
            )
            for name, shape in shapes.items()
        }
        self.comm, self.assignment = comm, balance(costs, comm.world_size)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def owns(self, name: str) -> bool:
        """Whether this worker computes layer ``name``'s inverse."""
        return self.assignment.owner(name) == self.comm.rank

    # ------------------------------------------------------------------ step hooks
    def curvature_update(self, curvature: Curvature) -> Callable[[LayerStats, float], None]:
        """:meth:`Curvature.update_across` over this group: every worker ends with the
        global batch's statistics."""
        return functools.partial(curvature.update_across, comm=self.comm)

    def observation(self, inverse: InverseStrategy) -> Callable[[LayerStats, float], None]:
        """:meth:`InverseStrategy.observe_across` over this group."""
        return functools.partial(inverse.observe_across, comm=self.comm)

    def refresh(self, blocks: Mapping[str, LayerBlock], dampings: Mapping[str, float]) -> None:
        """Refresh the inverses this worker owns, then receive every other owner's
        :meth:`InverseStrategy.broadcast_keys` (one description + one flat broadcast per
        owner). With ``share="gradient"`` only the numbers and flags travel (e.g.
        Sherman–Morrison's count of full updates, which decides when every worker's
        curvature switches to diagonals), not the tensors."""
        for name in self.assignment.layers_of(self.rank):
            blocks[name].refresh(dampings[name])
        for owner in range(self.world_size):
            names = self.assignment.layers_of(owner)
            if not names:
                continue
            mine = None
            if owner == self.rank:
                mine = {name: self._outgoing(blocks[name].inverse) for name in names}
            received = self.comm.broadcast_values(mine, src=owner)
            # The owner too adopts the received copies: same memory layout on every worker,
            # so every worker's matmuls in apply() round alike and the runs stay identical.
            for name, state in received.items():
                blocks[name].inverse.load_state_dict(state, partial=True)

    def precondition(
        self,
        blocks: Mapping[str, LayerBlock],
        grads: Mapping[str, Tensor],
        dampings: Mapping[str, float],
        scales: Mapping[str, float],
    ) -> dict[str, Tensor]:
        """``Δ`` of every layer in ``grads``. With ``share="inverse"`` every worker computes
        all of them (they agree: same gradients, same inverses). With ``share="gradient"``
        each worker preconditions only the layers it owns, then every owner broadcasts its
        ``Δ`` (one flat broadcast per owner and dtype)."""
        if self.share == "inverse":
            return precondition_blocks(blocks, grads, dampings, scales)
        mine = {n: g for n, g in grads.items() if self.owns(n)}
        deltas = {**grads, **precondition_blocks(blocks, mine, dampings, scales)}
        for owner in range(self.world_size):
            names = [n for n in self.assignment.layers_of(owner) if n in deltas]
            if names:
                shared = self.comm.broadcast_tensors([deltas[n] for n in names], src=owner)
                deltas.update(zip(names, shared))
        return deltas

    def _outgoing(self, inverse) -> dict[str, object]:
        state = {key: getattr(inverse, key) for key in inverse.broadcast_keys()}
        if self.share == "gradient":
            state = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
        return state
