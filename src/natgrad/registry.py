"""Methods by name, and the pairing of a method with an update rule.

``METHODS[name](model)`` builds a method with its defaults (its paper's, except K-FAC's
measured damping 0.1: docs/defaults.md). Register a new method
by adding its class here (or ``METHODS["mine"] = Mine`` from user code).
"""

from __future__ import annotations

from .methods import EKFAC, KFAC, SKFAC, SMKFAC, TEKFAC, TKFAC
from .preconditioner import Preconditioner

__all__ = ["METHODS"]

METHODS: dict[str, type[Preconditioner]] = {
    "kfac": KFAC,
    "ekfac": EKFAC,
    "tkfac": TKFAC,
    "tekfac": TEKFAC,
    "skfac": SKFAC,
    "smkfac": SMKFAC,
}
