"""Whether a ``step()`` runs: the checks between the backward pass and the step.

In order:

1. after ``remove()`` → ``RuntimeError`` (the hooks are gone);
2. no backward pass since the last step → ``RuntimeError``: ``.grad`` already holds ``Δ``,
   and preconditioning it again would double the step. The gate remembers the
   preconditioned layers' gradient tensors and their version counters as the step left
   them; a backward accumulates into them in place or, after ``zero_grad()``, creates new
   ones, so "the same tensors at the same versions" means no backward since;
3. loss scaling (:class:`~natgrad.amp.LossScaling`): gradients unscaled; a step the
   ``GradScaler`` will skip (Inf/NaN) is skipped here too, quietly;
4. a non-finite gradient on a preconditioned layer → the step is skipped with a
   :class:`~natgrad.errors.NumericalWarning`;
5. ``fisher="mc"`` on a step that wants statistics but without ``sample_fisher()`` since
   the last step → ``RuntimeError`` (it would never build factors).

A skipped step records no statistics (the passes recorded for it are dropped), leaves
every ``.grad`` as it is — the optimizer receives the plain gradient, NaN/Inf included —
and is not counted.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .amp import LossScaling
from .errors import NumericalWarning
from .linalg import all_finite

__all__ = ["StepGate"]

#: ``{layer name: the .grad of each of its parameters}``.
ParamGrads = Mapping[str, list[Tensor | None]]


class StepGate:
    """The checks of one preconditioner (see the module docstring).

    Args:
        grad_scaler: a ``torch.amp.GradScaler`` or ``None``.

    Attributes:
        removed: set by ``remove()``.
        sampled: ``sample_fisher()`` ran since the last step.
    """

    def __init__(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        self.scaling = LossScaling(grad_scaler)
        self.removed = False
        self.sampled = False
        self._left: dict[str, list[tuple[weakref.ref, int]]] = {}

    def check_usable(self) -> None:
        if self.removed:
            raise RuntimeError(
                "this preconditioner was remove()d: its hooks are off the model and it no "
                "longer rewrites gradients; build a new one to precondition again"
            )

    def note_sampled(self) -> None:
        """``sample_fisher()`` was called."""
        self.check_usable()
        self.sampled = True

    def open(
        self,
        param_grads: ParamGrads,
        grads: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer | None,
        needs_samples: bool,
    ) -> float | None:
        """The loss scale if the step runs, ``None`` if it is skipped.

        ``param_grads``: each preconditioned layer's parameter gradients now; ``grads``:
        their gradient matrices ``(d_out, d_in')``; ``needs_samples``: the Monte-Carlo
        Fisher wants statistics this step.
        """
        self.check_usable()
        if self._left and self._unchanged(param_grads):
            raise RuntimeError(
                "step() was already called for this backward pass: .grad holds the "
                "preconditioned direction already. Call step() once per backward pass "
                "(once after all micro-batches of an accumulated batch)"
            )
        scale, scaler_skips = self.scaling.prepare(optimizer)
        if scaler_skips:
            return None
        bad = [name for name, g in grads.items() if not all_finite(g)]
        if bad:
            warnings.warn(
                f"non-finite gradient (NaN/Inf) in layer(s) {bad}: step() skipped — no "
                "statistics, every .grad left as it is (the optimizer receives it, NaN/Inf "
                "included), the step not counted. Skip that optimizer step (a GradScaler "
                "does) or find the source.",
                NumericalWarning,
                stacklevel=3,
            )
            return None
        if needs_samples and not self.sampled:
            raise RuntimeError(
                "fisher='mc' needs preconditioner.sample_fisher(outputs) after the forward "
                "pass and before loss.backward() on this step (it records statistics); "
                "without it no factors are ever built"
            )
        return scale

    def close(self, param_grads: ParamGrads) -> None:
        """Remember the gradients as the step (run or skipped) leaves them."""
        self.sampled = False
        self._left = {
            name: [(weakref.ref(g), g._version) for g in gs if g is not None]
            for name, gs in param_grads.items()
        }

    def _unchanged(self, param_grads: ParamGrads) -> bool:
        seen_any = False
        for name, gs in param_grads.items():
            now = [g for g in gs if g is not None]
            left = self._left.get(name, [])
            if len(now) != len(left):
                return False
            for g, (ref, version) in zip(now, left):
                if ref() is not g or g._version != version:
                    return False
                seen_any = True
        return seen_any

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_left"] = {}  # weak references to this process's gradients
        return state
