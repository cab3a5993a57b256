"""Eigenvalue correction: a Kronecker eigenbasis with a re-scaling diagonal fitted to the
per-sample gradients in that basis (docs/math.md, "EKFAC" and "TEKFAC").

George et al. 2018 (EKFAC) with the Kronecker basis ``Q_A ⊗ Q_G`` of K-FAC's factors; Gao
et al. 2020 (TEKFAC, eqs. 3.2–3.3, 3.6) with the basis ``Q_Φ ⊗ Q_Ψ`` of TKFAC's factors.
Which basis is decided only by the curvature this strategy is given.

Two rules for the re-scaling (``scale_rule=``), both restarted in a new basis:

* ``"batch"``: every update *sets* ``S`` to the current mini-batch's estimate — Xu 2021,
  Algorithm 1, procedure UpdateScale (``s* ← E_D[...]``);
* ``"running"``: an exponential moving average of the batch estimates, as George et al.
  2018 and TEKFAC's eq. (3.6) (``β₁``) do.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from ..capture import LayerStats
from ..config import check_positive_int
from ..curvature import Curvature, NonFiniteStatistics
from ..linalg import all_finite, eigen_precondition, kronecker_eigenbases, running_average
from ..persample import basis_second_moment
from .base import InverseStrategy

__all__ = ["EigenCorrectedInverse", "RescaledBasisInverse", "SCALE_RULES"]

#: Re-scaling rules (module docstring).
SCALE_RULES = ("batch", "running")


class RescaledBasisInverse(InverseStrategy):
    """What every eigenvalue-corrected inverse shares: a Kronecker basis refreshed every
    ``T_inv`` and a re-scaling fitted in it to per-sample gradients every ``T_s`` steps,
    restarted in each new basis.

    A subclass names its re-scaling tensors in ``_scale_keys``, computes one batch's
    estimate of them in :meth:`batch_scale`, sets them (and ``fresh_basis = True``) in
    :meth:`refresh`, and applies them in :meth:`apply`. :meth:`observe` folds the batch
    estimates in by the rule ``scale_rule`` (module docstring): the first batch in a new
    basis, and every batch under ``"batch"``, replaces them; otherwise
    ``X ← ε X + (1−ε) X_batch``.

    Args:
        observe_every: ``T_s``, steps between re-scaling updates (>= 1).
        scale_rule: ``"batch"`` or ``"running"``.

    Attributes:
        fresh_basis: the re-scaling still holds the eigenvalue initialisation of a new basis.
    """

    #: Names of the re-scaling tensors :meth:`observe` updates.
    _scale_keys: ClassVar[tuple[str, ...]] = ()
    damping_in_refresh = False

    def __init__(
        self, *args, observe_every: int = 10, scale_rule: str = "running", **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        check_positive_int("observe_every", observe_every)
        check_scale_rule(scale_rule)
        self.observe_every = observe_every
        self.scale_rule = scale_rule
        self.fresh_basis = False

    @abstractmethod
    def batch_scale(self, stats: LayerStats) -> tuple[Tensor, ...]:
        """One batch's estimate of each tensor named in ``_scale_keys`` (``stats`` already
        in this strategy's dtype)."""

    @abstractmethod
    def trace(self) -> float:
        """The trace of the approximate (undamped) block."""

    def observe(self, stats: LayerStats, decay: float) -> None:
        batch = self.batch_scale(stats.to(self.dtype))
        if not all(all_finite(t) for t in batch):
            raise NonFiniteStatistics("batch statistics contain NaN or Inf")
        restart = self.fresh_basis or self.scale_rule == "batch"
        for key, value in zip(self._scale_keys, batch):
            old = None if restart else getattr(self, key)
            setattr(self, key, running_average(old, value, decay))
        self.fresh_basis = False

    def observed_keys(self) -> tuple[str, ...]:
        """Under data parallelism only the re-scaling is averaged after :meth:`observe`
        (the basis is the owner's, already the same on every worker; docs/distributed.md)."""
        return self._scale_keys


class EigenCorrectedInverse(RescaledBasisInverse):
    """``Δ = Q_G [ (Q_Gᵀ ∇W̄ Q_A) ⊘ (S + λ) ] Q_Aᵀ`` — damping on the re-scaling ``S``.

    * :meth:`refresh` (every ``T_inv``): eigenbases ``Q_A``, ``Q_G`` of ``curvature.factors()``
      (K-FAC's ``A``, ``G`` for EKFAC; ``sqrt(δ)Φ``, ``sqrt(δ)Ψ`` for TEKFAC). A running
      average across bases is meaningless, so ``S`` restarts: it is set to the factors'
      own eigenvalues ``γ αᵀ`` (so the strategy is usable at once, as K-FAC's eigen form)
      and the next observed batch *replaces* it.
    * :meth:`observe` (every ``observe_every = T_s`` steps, and right after a refresh):
      ``S_batch = (1/M) Σ_i (Q_Gᵀ ∇W̄_i Q_A)^{⊙2}``
      (:func:`~natgrad.persample.basis_second_moment`); ``scale_rule="running"``:
      ``S ← ε S + (1−ε) S_batch``, the first batch in a new basis taken as is;
      ``scale_rule="batch"``: ``S ← S_batch``.
    * :meth:`apply`: the formula above, with the damping ``λ`` of the call.

    Args: those of :class:`RescaledBasisInverse`.

    Attributes:
        Q_A: ``(d_in', d_in')`` input-side eigenbasis; ``Q_G``: ``(d_out, d_out)``.
        S: ``(d_out, d_in')`` re-scaling (``S`` of EKFAC, ``Θ`` of TEKFAC).
        fresh_basis: ``S`` still holds the eigenvalue initialisation of a new basis.
    """

    _state_keys = ("Q_A", "Q_G", "S", "fresh_basis")
    _scale_keys = ("S",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.Q_A: Tensor | None = None
        self.Q_G: Tensor | None = None
        self.S: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.Q_A is not None

    def refresh(self, curvature: Curvature, damping: float) -> None:
        alpha, Q_A, gamma, Q_G = kronecker_eigenbases(*curvature.factors())
        self.Q_A, self.Q_G, self.S = Q_A, Q_G, gamma.outer(alpha)
        self.fresh_basis = True

    def batch_scale(self, stats: LayerStats) -> tuple[Tensor]:
        return (basis_second_moment(stats.a, stats.g, self.Q_A, self.Q_G),)

    def scale(self, damping: float) -> Tensor:
        """The diagonal ``S + λ`` (``(d_out, d_in')``) that :meth:`apply` divides by."""
        return self.S + damping

    def trace(self) -> float:
        """``tr S``: the trace of the approximate block ``(Q_A⊗Q_G) diag(S) (Q_A⊗Q_G)ᵀ``."""
        return torch.sum(self.S).item()

    def apply(self, grad: Tensor, damping: float) -> Tensor:
        return eigen_precondition(self.Q_G, grad, self.Q_A, self.scale(damping))

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """``(Q_A⊗Q_G) diag(vec(S) + λ) (Q_A⊗Q_G)ᵀ`` (``S`` is fitted, not a function of the
        curvature: the stored basis and re-scaling are used)."""
        K = torch.kron(self.Q_A, self.Q_G)
        return K @ torch.diag(self.S.T.reshape(-1) + damping) @ K.T


def check_scale_rule(scale_rule: str) -> None:
    """Raise ``ValueError`` unless ``scale_rule`` is one of :data:`SCALE_RULES`."""
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
