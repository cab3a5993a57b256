"""Which steps update the curvature, refresh the inverses, and observe (docs/math.md §1).

Schedules count from step 0: step ``t`` updates the curvature when ``t % T_cov == 0``,
refreshes when ``t % T_inv == 0`` (or after a change that makes every inverse stale), and
an inverse with :attr:`~natgrad.inverses.InverseStrategy.observe_every` observes when
``t % observe_every == 0`` or on a refresh step. The steps listed in ``warm_start`` do
both, besides (extra refreshes while the factors are young).
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import PreconditionerConfig
from .inverses import InverseStrategy

__all__ = ["Schedule"]


class Schedule:
    """The step schedule of one preconditioner.

    Attributes:
        stale: the inverses must be recomputed at the next step (a new ``damping`` or
            ``T_inv``), whatever the step.
    """

    def __init__(self) -> None:
        self.stale = False

    def updates_curvature(self, config: PreconditionerConfig, step: int) -> bool:
        return step % config.T_cov == 0 or step in config.warm_start

    def refreshes(self, config: PreconditionerConfig, step: int) -> bool:
        return step % config.T_inv == 0 or self.stale or step in config.warm_start

    def observes(self, config: PreconditionerConfig, step: int, inverse: InverseStrategy) -> bool:
        every = inverse.observe_every
        return every is not None and (step % every == 0 or self.refreshes(config, step))

    def wants_stats(
        self, config: PreconditionerConfig, step: int, inverses: Iterable[InverseStrategy]
    ) -> bool:
        """Whether step ``step`` needs the batch's rows (capture records them)."""
        return self.updates_curvature(config, step) or any(
            self.observes(config, step, inverse) for inverse in inverses
        )
