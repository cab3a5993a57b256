"""Typed, validated hyperparameters shared by the K-FAC family.

Each method has one ``kw_only`` dataclass; ``__post_init__`` rejects bad values with the
argument's name, the value received and what is allowed. Change values during training
with :meth:`natgrad.Preconditioner.configure`, which validates the same way.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["PreconditionerConfig", "check_positive", "check_positive_int", "check_decay"]


def check_positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_decay(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(kw_only=True)
class PreconditionerConfig:
    """Hyperparameters every method shares (docs/math.md §1–§2).

    Attributes:
        damping: Tikhonov damping ``λ`` (> 0).
        decay: running-average decay ``ε`` of the curvature statistics, in [0, 1).
        T_cov: steps between curvature (factor) updates (>= 1).
        T_inv: steps between inverse / eigendecomposition updates (>= 1).
        kl_clip: KL-clipping bound ``κ`` (> 0), or ``None`` to switch clipping off.
    """

    damping: float = 1e-3
    decay: float = 0.95
    T_cov: int = 10
    T_inv: int = 100
    kl_clip: float | None = 1e-3

    def __post_init__(self) -> None:
        check_positive("damping", self.damping)
        check_decay("decay", self.decay)
        check_positive_int("T_cov", self.T_cov)
        check_positive_int("T_inv", self.T_inv)
        if self.kl_clip is not None:
            check_positive("kl_clip", self.kl_clip)

    def observe_decay(self) -> float:
        """Running-average decay of what an inverse strategy fits in its own basis
        (EKFAC's ``S``): ``decay`` unless a method's config says otherwise."""
        return self.decay

    def replace(
        self, changes: Mapping[str, Any], fixed: Collection[str] = (), owner: str = "the method"
    ) -> PreconditionerConfig:
        """A validated copy with ``changes``; fields in ``fixed`` (decided at construction
        by ``owner``) may not change."""
        allowed = [f.name for f in fields(self)]
        unknown = set(changes) - set(allowed)
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {sorted(unknown)}; allowed: {', '.join(allowed)}"
            )
        for name in fixed:
            if name in changes and changes[name] != getattr(self, name):
                raise ValueError(
                    f"{name} is fixed when the preconditioner is built (here "
                    f"{getattr(self, name)!r}); build a new {owner}(..., "
                    f"{name}={changes[name]!r}) instead"
                )
        return replace(self, **changes)

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
