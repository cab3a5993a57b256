"""EKFAC (George et al. 2018; ``001_…``): K-FAC's Kronecker eigenbasis with the
re-scaling ``S`` fitted to per-sample gradients, damping on ``S`` (MATH.md, EKFAC)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import PreconditionerConfig, check_decay, check_positive_int
from ..curvature import KroneckerFactors
from ..inverses import EigenCorrectedInverse
from ..preconditioner import Preconditioner

__all__ = ["EKFAC", "EKFACConfig", "RescalingConfig", "RescalingSchedule"]


@dataclass(kw_only=True)
class RescalingConfig(PreconditionerConfig):
    """Adds the fields of methods that re-fit a re-scaling in the Kronecker eigenbasis
    (EKFAC's ``S``, TEKFAC's ``Θ``):

    Attributes:
        T_s: steps between updates of the re-scaling (>= 1).
        rescale_decay: running-average decay of the re-scaling, in [0, 1) (``004_…``'s
            ``β₁``, beside ``β₂ = decay`` for the factors); ``None``: the same as ``decay``.
    """

    T_s: int = 10
    rescale_decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("T_s", self.T_s)
        if self.rescale_decay is not None:
            check_decay("rescale_decay", self.rescale_decay)


@dataclass(kw_only=True)
class EKFACConfig(RescalingConfig):
    """EKFAC's hyperparameters, defaults from ``001_…``: ``ε = 0.95`` (factors and ``S``),
    ``T_cov = 10``, ``T_inv = 100`` (eigenbasis), ``T_s = 10`` (re-scaling), KL clip
    ``1e-2``, damping ``1e-3`` (the paper's grid is {3e-2, 3e-3, 1e-3})."""

    damping: float = 1e-3
    kl_clip: float | None = 1e-2


class RescalingSchedule:
    """Mixin for a preconditioner whose config is a :class:`RescalingConfig`: keeps each
    layer's :class:`~natgrad.inverses.EigenCorrectedInverse` ``observe_every`` equal to
    ``config.T_s`` through :meth:`configure` and :meth:`load_state_dict`, and averages the
    re-scaling with ``config.rescale_decay``."""

    def observe_decay(self) -> float:
        decay = self.config.rescale_decay
        return self.config.decay if decay is None else decay

    def _sync_rescaling_schedule(self) -> None:
        for layer in self.layers.values():
            layer.inverse.observe_every = self.config.T_s
        self._capture.active = self._capture.active or self._wants_stats(self.steps)

    def configure(self, **changes: Any) -> None:
        super().configure(**changes)
        self._sync_rescaling_schedule()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._sync_rescaling_schedule()


class EKFAC(RescalingSchedule, Preconditioner):
    """EKFAC for ``nn.Linear`` and ``nn.Conv2d``:
    ``Δ = Q_G [ (Q_Gᵀ ∇W̄ Q_A) ⊘ (S + λ) ] Q_Aᵀ`` per layer.

    ``Q_A``, ``Q_G`` are the eigenbases of K-FAC's running ``A``, ``G`` (every ``T_inv``
    steps); ``S`` is the running second moment of per-sample gradients in that basis
    (every ``T_s`` steps, restarted when the basis changes). ``natgrad.EKFAC(model)``
    uses :class:`EKFACConfig`'s defaults; EKFAC-NAG/-Adam/-RAdam of ``001_…`` are
    ``natgrad.build("ekfac+nag" | "ekfac+adam" | "ekfac+radam", model, lr=...)``.
    """

    config_class = EKFACConfig

    def make_curvature(self, shape, dtype, device) -> KroneckerFactors:
        return KroneckerFactors(shape, dtype, device)

    def make_inverse(self, shape, dtype, device) -> EigenCorrectedInverse:
        return EigenCorrectedInverse(dtype, device, observe_every=self.config.T_s)
