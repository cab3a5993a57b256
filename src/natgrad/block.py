"""One preconditioned layer: its record, curvature estimate and inverse, and the guarded
operations on them (kfac-jax's *block*).

A :class:`LayerBlock` is what the preconditioner, the sharing strategies (natgrad/sharing.py)
and the data-parallel code work on. Its operations never let a numerical fault corrupt
state: non-finite statistics leave the running estimate as it was, a failed inverse update
is retried with more damping and then falls back, a non-finite ``Δ`` falls back to the
gradient; each fault is reported once per layer (:class:`~natgrad.errors.NumericalWarning`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .capture import LayerStats
from .curvature import Curvature
from .errors import DecompositionError, NonFiniteStatistics, WarnOnce
from .inverses import InverseStrategy
from .layers import LayerHandler
from .linalg import all_finite

__all__ = ["LayerBlock", "RETRY_DAMPING"]

#: Damping multipliers tried, in order, when an inverse update fails.
RETRY_DAMPING = (10.0, 100.0)

#: ``fn(stats, decay)``: how rows are folded in (one process, or across workers).
Fold = Callable[[LayerStats, float], None]


@dataclass(eq=False)
class LayerBlock:
    """One handled layer.

    Attributes:
        name: the module's qualified name in the model.
        module: the layer.
        handler: how the layer gives rows and its gradient matrix (natgrad/layers.py).
        curvature: the running estimate of the layer's Fisher block.
        inverse: how its inverse is applied.
        faults: the warn-once log shared by every block of a preconditioner.
    """

    name: str
    module: nn.Module
    handler: LayerHandler
    curvature: Curvature
    inverse: InverseStrategy
    faults: WarnOnce = field(default_factory=WarnOnce, repr=False)

    @classmethod
    def build(
        cls,
        name: str,
        module: nn.Module,
        handler: LayerHandler,
        method: Any,
        faults: WarnOnce,
    ) -> LayerBlock:
        """The block of ``module``, its curvature and inverse made by ``method``'s
        ``make_curvature(shape, dtype, device)`` and ``make_inverse(shape, dtype, device)``."""
        shape = handler.shape(module)
        weight = module.weight
        # Factors and decompositions in float32 or wider, whatever the model's dtype.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        curvature = method.make_curvature(shape, dtype, weight.device)
        inverse = method.make_inverse(shape, dtype, weight.device)
        return cls(name, module, handler, curvature, inverse, faults)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in')`` of the gradient matrix ``∇W̄``."""
        return self.handler.shape(self.module)

    def follow_parameters(self) -> None:
        """Move the curvature and inverse state to the weight's device and to float32 or
        wider of its dtype, when the model was moved or cast after the block was built
        (``model.double()``, ``model.to(device)``)."""
        weight = self.module.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        for part in (self.curvature, self.inverse):
            if part.dtype != dtype or part.device != weight.device:
                state = part.state_dict()
                part.dtype, part.device = dtype, weight.device
                part.load_state_dict(state)

    # ------------------------------------------------------------------ gradients
    def grad_matrix(self) -> Tensor | None:
        """``∇W̄`` ``(d_out, d_in')`` from the parameters' ``.grad``; ``None`` if unset."""
        return self.handler.grad_matrix(self.module)

    def write_grad_matrix(self, mat: Tensor) -> None:
        """Write ``mat`` ``(d_out, d_in')`` into the parameters' ``.grad``."""
        self.handler.write_grad_matrix(self.module, mat)

    # ------------------------------------------------------------------ statistics
    def fold(self, stats: LayerStats, decay: float, update: Fold | None = None) -> bool:
        """Fold one batch into the curvature (``update``: :meth:`Curvature.update`, or the
        data-parallel one). The first batch is taken as is (decay 0). On NaN/Inf
        statistics: warn once, keep the previous estimate, return ``False``."""
        update = self.curvature.update if update is None else update
        decay = decay if self.curvature.initialized else 0.0
        return self._guard("statistics", update, stats, decay)

    def observe(self, stats: LayerStats, decay: float, observe: Fold | None = None) -> bool:
        """Fold one batch into the inverse's own statistics (EKFAC's ``S``), guarded like
        :meth:`fold`."""
        observe = self.inverse.observe if observe is None else observe
        return self._guard("observe", observe, stats, decay)

    def _guard(self, what: str, fn: Fold, stats: LayerStats, decay: float) -> bool:
        try:
            fn(stats, decay)
            return True
        except NonFiniteStatistics:
            self.faults.warn(
                self.name,
                what,
                f"layer {self.name!r}: non-finite {what} in this batch; kept the "
                "previous running estimate",
            )
            return False

    # ------------------------------------------------------------------ inverse
    def refresh(self, damping: float) -> None:
        """Recompute the inverse at damping ``λ``. When the refresh depends on ``λ``
        (:attr:`InverseStrategy.damping_in_refresh`), a failure is retried at
        ``λ·RETRY_DAMPING``; if all fail the previous inverse (or the plain gradient)
        stays in use. Nothing happens before the curvature's first batch."""
        if not self.curvature.initialized:
            return
        factors = (1.0, *RETRY_DAMPING) if self.inverse.damping_in_refresh else (1.0,)
        for factor in factors:
            try:
                self.inverse.refresh(self.curvature, damping * factor)
            except DecompositionError as err:
                last = err
                continue
            if factor != 1.0:
                self.faults.warn(
                    self.name,
                    "retry",
                    f"layer {self.name!r}: inverse update failed at damping "
                    f"{damping:g}; succeeded with {damping * factor:g}",
                )
            return
        fallback = "the previous inverse" if self.inverse.ready else "the plain gradient"
        tried = f" even with damping {damping * factors[-1]:g}" if len(factors) > 1 else ""
        self.faults.warn(
            self.name,
            "refresh",
            f"layer {self.name!r}: inverse update failed{tried} ({last}); using {fallback}",
        )

    def apply(self, grad: Tensor, damping: float, scale: float = 1.0) -> Tensor:
        """``Δ`` for ``grad`` ``(d_out, d_in')``: the inverse applied at ``damping``, divided
        by ``scale`` (the block is ``scale·F̂``, TKFAC's ``β``: see natgrad/damping.py).
        Before the first refresh ``grad`` is returned; a non-finite result falls back to
        ``grad`` (still divided by ``scale``)."""
        if not self.inverse.ready:
            return grad
        delta = self.inverse.apply(grad.to(self.inverse.dtype), damping)
        if not all_finite(delta):
            if torch.isfinite(grad).all():
                self.faults.warn(
                    self.name,
                    "apply",
                    f"layer {self.name!r}: preconditioned gradient is not "
                    "finite; used the plain gradient",
                )
            delta = grad
        delta = delta.to(grad.dtype)
        return delta / scale if scale != 1.0 else delta

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"curvature": self.curvature.state_dict(), "inverse": self.inverse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curvature.load_state_dict(state["curvature"])
        self.inverse.load_state_dict(state["inverse"])
