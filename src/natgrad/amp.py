"""Loss scaling (mixed precision): what a ``torch.amp.GradScaler`` means for the step.

``scaler.scale(loss).backward()`` multiplies every gradient by the scale ``s`` — the
output gradients the hooks capture included, so ``G`` would come out ``s²`` too large
and ``Δ`` collapse. With ``grad_scaler=scaler`` the preconditioner

* unscales the optimizer's gradients first (``scaler.unscale_(optimizer)``, unless you
  already did, e.g. to clip them), so ``Δ`` and KL clipping see the true gradient;
* divides the captured output gradients by ``s``;
* skips the steps the scaler skips (Inf/NaN in the scaled gradients): no statistics, no
  preconditioning, ``.grad`` left for ``scaler.step`` to discard, and the step not counted.

The scaler's bookkeeping of one optimizer (unscaled yet? Inf/NaN found?) is not public
API; it is read in :meth:`LossScaling.prepare` only.
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

__all__ = ["LossScaling"]


class LossScaling:
    """The loss scale of one preconditioner: a ``GradScaler``, or none (scale 1).

    Args:
        scaler: a ``torch.amp.GradScaler`` (or ``torch.cuda.amp.GradScaler``), or ``None``.
    """

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
            )
        self.scaler = scaler

    @property
    def enabled(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def prepare(self, optimizer: torch.optim.Optimizer | None) -> tuple[float, bool]:
        """Unscale ``optimizer``'s gradients if not yet done; return ``(s, skipped)``: the
        scale the loss was multiplied by and whether ``scaler.step`` will skip this step.

        Raises:
            RuntimeError: a scaler without an optimizer to unscale.
        """
        if not self.enabled:
            return 1.0, False
        if optimizer is None:
            raise RuntimeError(
                "grad_scaler needs the optimizer whose gradients it scales: pass optimizer= "
                "to the constructor or call attach(optimizer)"
            )
        scaler = self.scaler
        state = scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError(
                "scaler.step(optimizer) ran before the preconditioner's step(): call "
                "step() after the backward pass and before scaler.step(optimizer)"
            )
        if state["stage"] is OptState.READY:
            scaler.unscale_(optimizer)
        found_inf = sum(v.item() for v in state["found_inf_per_device"].values())
        return float(scaler.get_scale()), found_inf > 0
