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

from .quadratic import LIKELIHOODS

__all__ = [
    "PreconditionerConfig",
    "LowRankConfig",
    "LOW_RANK_FIELDS",
    "THINNING_FIELDS",
    "ThinningConfig",
    "is_wide",
    "check_positive",
    "check_positive_int",
    "check_decay",
]

#: How the step size is set: ``"lr"`` (the optimizer's learning rate, KL-clipped when
#: ``kl_clip`` is set) or ``"quadratic"`` (the local quadratic model, natgrad/adaptive.py).
STEP_SIZES = ("lr", "quadratic")


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


def check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_steps(name: str, value: Any) -> tuple[int, ...]:
    """A collection of step numbers (integers >= 0) as a sorted tuple."""
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
    )
    if not ok:
        raise ValueError(f"{name} must be a list of step numbers (integers >= 0), got {value!r}")
    return tuple(sorted(set(value)))


def check_bounds(name: str, value: Any) -> tuple[float, float]:
    """``(lower, upper)`` with ``0 < lower <= upper``, both finite."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in value
    )
    if not ok or value[0] > value[1]:
        raise ValueError(f"{name} must be (lower, upper) with 0 < lower <= upper, got {value!r}")
    return float(value[0]), float(value[1])


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
        kl_clip: KL-clipping bound ``κ`` (> 0), or ``None`` to switch clipping off. With
            ``step_size="quadratic"`` it bounds only the steps the quadratic model cannot
            size (a loss that is not the likelihood's).
        warm_start: extra steps (integers >= 0) that update the curvature and refresh the
            inverses, besides ``t % T_cov == 0`` and ``t % T_inv == 0``: so that the first
            ``T_inv`` steps do not run on the inverse of one batch's factors.
        step_size: ``"lr"`` — the optimizer's learning rate sets the step (KL-clipped when
            ``kl_clip`` is set); ``"quadratic"`` — the update ``u = α(−Δ) + μ m`` minimises
            the local quadratic model (``m``: the previous update; natgrad/adaptive.py) and
            ``.grad ← −u``: pair it with plain ``torch.optim.SGD(lr=1.0)``.
        step_momentum: with ``"quadratic"``, solve for ``μ`` too (else ``μ = 0``).
        curvature_samples: samples of the batch the quadratic model's curvature products
            use (``None``: all).
        T_step: steps between re-solving ``(α, μ)`` (>= 1); in between they are reused.
        lm_damping: adapt ``λ`` by Levenberg–Marquardt's rule from the reduction ratio
            ``ρ`` (actual over predicted loss change), measured every ``T_lm`` steps.
        T_lm: steps between measurements of ``ρ`` (>= 1).
        lm_omega: ``λ`` is multiplied by ``lm_omega**T_lm`` when ``ρ > 3/4`` and divided by
            it when ``ρ < 1/4``; in (0, 1).
        damping_bounds: ``(lower, upper)`` limits of the adapted ``λ``.
        likelihood: the loss the quadratic model assumes: ``"categorical"``
            (cross-entropy, any soft or smoothed targets) or ``"gaussian"`` (``½‖y − f‖²``).
    """

    damping: float = 1e-3
    decay: float = 0.95
    T_cov: int = 10
    T_inv: int = 100
    kl_clip: float | None = 1e-3
    warm_start: tuple[int, ...] = ()
    step_size: str = "lr"
    step_momentum: bool = True
    curvature_samples: int | None = 32
    T_step: int = 1
    lm_damping: bool = False
    T_lm: int = 5
    lm_omega: float = 0.95
    damping_bounds: tuple[float, float] = (1e-6, 100.0)
    likelihood: str = "categorical"

    def __post_init__(self) -> None:
        check_positive("damping", self.damping)
        check_decay("decay", self.decay)
        check_positive_int("T_cov", self.T_cov)
        check_positive_int("T_inv", self.T_inv)
        if self.kl_clip is not None:
            check_positive("kl_clip", self.kl_clip)
        self.warm_start = check_steps("warm_start", self.warm_start)
        if self.step_size not in STEP_SIZES:
            raise ValueError(f"step_size must be one of {STEP_SIZES}, got {self.step_size!r}")
        check_bool("step_momentum", self.step_momentum)
        if self.curvature_samples is not None:
            check_positive_int("curvature_samples", self.curvature_samples)
        check_positive_int("T_step", self.T_step)
        check_bool("lm_damping", self.lm_damping)
        check_positive_int("T_lm", self.T_lm)
        if isinstance(self.lm_omega, bool) or not isinstance(self.lm_omega, (int, float)) or not (
            0 < self.lm_omega < 1
        ):
            raise ValueError(f"lm_omega must be in (0, 1), got {self.lm_omega!r}")
        self.damping_bounds = check_bounds("damping_bounds", self.damping_bounds)
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")

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


#: :class:`LowRankConfig`'s fields: they decide what each layer stores, so a method that
#: has them lists them in its ``fixed_fields``.
LOW_RANK_FIELDS = ("low_rank", "low_rank_above")

#: :class:`ThinningConfig`'s field: it decides each layer's curvature object, so a method
#: that has it lists it in its ``fixed_fields``.
THINNING_FIELDS = ("statistics_positions",)


@dataclass(kw_only=True)
class LowRankConfig(PreconditionerConfig):
    """Adds the fields of methods that can keep a wide Kronecker factor as its top
    eigenvectors plus one isotropic rest (K-FAC's factored inverse, EKFAC's and TEKFAC's
    eigenvalue-corrected one; docs/math.md §2 "Wide factors", §3):

    Attributes:
        low_rank: ``k`` (integer >= 1), or ``None`` (off): a factor wider than
            ``max(low_rank_above, k)`` keeps only its top-``k`` eigenvectors ``U``
            ``(n, k)``, found by warm-started subspace iteration instead of an ``n³``
            decomposition; the rest of its space is one isotropic block.
        low_rank_above: the width (integer >= 0) above which ``low_rank`` applies.
    """

    low_rank: int | None = None
    low_rank_above: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low_rank is not None:
            check_positive_int("low_rank", self.low_rank)
        if (
            isinstance(self.low_rank_above, bool)
            or not isinstance(self.low_rank_above, int)
            or self.low_rank_above < 0
        ):
            raise ValueError(f"low_rank_above must be an integer >= 0, got {self.low_rank_above!r}")

    def is_wide(self, n: int) -> bool:
        """Whether a factor of width ``n`` is kept as low rank (``low_rank`` is set and
        :func:`is_wide` holds)."""
        return self.low_rank is not None and is_wide(n, self.low_rank, self.low_rank_above)


@dataclass(kw_only=True)
class ThinningConfig(PreconditionerConfig):
    """Adds the field of methods whose running ``A`` and ``G`` may come from some of a
    convolution's output positions (K-FAC, EKFAC; docs/math.md §1, "Thinned positions"):

    Attributes:
        statistics_positions: the factors of a layer with several output positions per
            sample (``nn.Conv2d``: ``P = H_out·W_out``) are computed from at most this
            many of them, drawn afresh at each curvature update and scaled so that ``A``
            and ``G`` stay unbiased (:func:`~natgrad.curvature.kronecker.thin_positions`);
            ``None`` (default): all of them. Only the factors are thinned: EKFAC's
            per-sample re-scaling still sums every position.
    """

    statistics_positions: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.statistics_positions is not None:
            check_positive_int("statistics_positions", self.statistics_positions)


def is_wide(n: int, rank: int, above: int) -> bool:
    """Whether a factor of width ``n`` is approximated at rank ``k``: ``n > max(above, k)``
    (a factor no wider than ``k`` has nothing left to approximate)."""
    return n > max(above, rank)
