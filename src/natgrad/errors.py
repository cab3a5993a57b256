"""natgrad's exceptions and warnings: the ground floor every other module may import.

* :class:`DecompositionError` — a factorisation (Cholesky, eigh) failed; the caller
  retries with more damping or keeps the previous inverse.
* :class:`NonFiniteStatistics` — a batch produced NaN/Inf statistics; the running
  estimate was left unchanged.
* :class:`NumericalWarning` — a numerical fault was met and handled.
* :class:`ClippingWarning` — KL clipping has bounded every recent step.
* :class:`UnsupportedLayerWarning` — a layer is left to the optimizer.
"""

from __future__ import annotations

import warnings

__all__ = [
    "ClippingWarning",
    "DecompositionError",
    "NonFiniteStatistics",
    "NumericalWarning",
    "UnsupportedLayerWarning",
    "WarnOnce",
]


class DecompositionError(RuntimeError):
    """A Cholesky or eigendecomposition failed or produced non-finite values."""


class NonFiniteStatistics(ArithmeticError):
    """A batch produced NaN/Inf statistics; the running estimate was left unchanged."""


class NumericalWarning(RuntimeWarning):
    """A numerical fault was met and handled (the step fell back; training goes on)."""


class ClippingWarning(UserWarning):
    """KL clipping has bounded every recent step, so the learning rate no longer sets the
    step size (``η·ν·Δ`` with ``ν ∝ 1/η``)."""


class UnsupportedLayerWarning(UserWarning):
    """A Linear/Conv2d configuration natgrad cannot precondition; it is left untouched."""


class WarnOnce:
    """Issues each ``(layer, kind)`` warning once (a fault repeating every step would
    flood the log; the first report says what happened and that training goes on)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def warn(
        self, name: str, kind: str, message: str, category: type[Warning] = NumericalWarning
    ) -> None:
        if (name, kind) not in self.seen:
            self.seen.add((name, kind))
            warnings.warn(message, category, stacklevel=4)
