"""EKFAC (George et al. 2018; the update rules of Xu 2021): K-FAC's Kronecker eigenbasis
with the re-scaling ``S`` fitted to per-sample gradients, damping on ``S``
(docs/math.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import (
    LOW_RANK_FIELDS,
    THINNING_FIELDS,
    LowRankConfig,
    PreconditionerConfig,
    ThinningConfig,
    check_decay,
    check_positive_int,
)
from ..curvature import KroneckerFactors, kronecker_factors
from ..inverses import EigenCorrectedInverse, LowRankEigenCorrectedInverse
from ..inverses.eigen_corrected import RescaledBasisInverse, check_scale_rule
from ..preconditioner import Preconditioner

__all__ = [
    "EKFAC",
    "EKFACConfig",
    "RescalingConfig",
    "make_rescaled_inverse",
    "sync_rescaling",
]


@dataclass(kw_only=True)
class RescalingConfig(PreconditionerConfig):
    """Adds the fields of methods that re-fit a re-scaling in the Kronecker eigenbasis
    (EKFAC's ``S``, TEKFAC's ``Θ``):

    Attributes:
        T_s: steps between updates of the re-scaling (>= 1).
        rescale_decay: running-average decay of the re-scaling, in [0, 1) (TEKFAC's
            ``β₁``, Gao et al. 2020 eq. 3.6, beside ``β₂ = decay`` for the factors);
            ``None``: the same as ``decay``. Used by ``scale_rule="running"`` only.
        scale_rule: ``"running"`` (an exponential average of the batch estimates,
            restarted in each new basis) or ``"batch"`` (each update sets the re-scaling to
            the current mini-batch's estimate, Xu 2021's UpdateScale); docs/math.md §3,
            §9.3.
    """

    T_s: int = 10
    rescale_decay: float | None = None
    scale_rule: str = "running"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("T_s", self.T_s)
        if self.rescale_decay is not None:
            check_decay("rescale_decay", self.rescale_decay)
        check_scale_rule(self.scale_rule)

    def observe_decay(self) -> float:
        """``rescale_decay``, or ``decay`` when it is ``None``."""
        return self.decay if self.rescale_decay is None else self.rescale_decay


@dataclass(kw_only=True)
class EKFACConfig(RescalingConfig, LowRankConfig, ThinningConfig):
    """EKFAC's hyperparameters, defaults from Xu 2021 (Algorithm 1): ``ε = 0.95`` (the
    factors), ``T_cov = 10``, ``T_inv = 100`` (eigenbasis), ``T_s = 10`` (re-scaling), KL
    clip ``1e-2``, ``S`` set to each mini-batch's estimate (``scale_rule="batch"``),
    damping ``1e-3`` (the thesis's grid is {3e-2, 3e-3, 1e-3}).

    ``low_rank=k`` (:class:`~natgrad.config.LowRankConfig`; off by default): a layer whose
    input factor is wider than ``max(low_rank_above, k)`` keeps its top-``k``
    eigenvectors and one re-scaling per output direction on the rest of the input space
    (:class:`~natgrad.inverses.LowRankEigenCorrectedInverse`, docs/math.md §3); the
    output side keeps its full eigenbasis.

    ``statistics_positions`` (:class:`~natgrad.config.ThinningConfig`; off by default):
    the running ``A`` and ``G`` that give the eigenbasis come from at most that many of a
    convolution's output positions per sample; ``S`` still sums all of them."""

    damping: float = 1e-3
    kl_clip: float | None = 1e-2
    scale_rule: str = "batch"


def make_rescaled_inverse(
    config: RescalingConfig, shape: tuple[int, int], dtype, device
) -> RescaledBasisInverse:
    """EKFAC's and TEKFAC's ``make_inverse``: the eigenvalue-corrected inverse of a layer of
    ``shape`` ``(d_out, d_in')``, with its input side as low rank when ``config.low_rank``
    is set and ``d_in'`` is wide (:meth:`~natgrad.config.LowRankConfig.is_wide`)."""
    kwargs = dict(observe_every=config.T_s, scale_rule=config.scale_rule)
    if config.is_wide(shape[1]):
        return LowRankEigenCorrectedInverse(
            dtype, device, shape=shape, rank=config.low_rank, **kwargs
        )
    return EigenCorrectedInverse(dtype, device, **kwargs)


def sync_rescaling(pre: Preconditioner) -> None:
    """Keep each layer's :class:`~natgrad.inverses.EigenCorrectedInverse`
    ``observe_every`` and ``scale_rule`` equal to ``config.T_s`` and ``config.scale_rule``
    (EKFAC's and TEKFAC's ``sync_layers``)."""
    for block in pre.layers.values():
        block.inverse.observe_every = pre.config.T_s
        block.inverse.scale_rule = pre.config.scale_rule


class EKFAC(Preconditioner):
    """EKFAC for ``nn.Linear`` and ``nn.Conv2d``:
    ``Δ = Q_G [ (Q_Gᵀ ∇W̄ Q_A) ⊘ (S + λ) ] Q_Aᵀ`` per layer.

    ``Q_A``, ``Q_G`` are the eigenbases of K-FAC's running ``A``, ``G`` (every ``T_inv``
    steps); ``S`` is the second moment of per-sample gradients in that basis (every
    ``T_s`` steps: the mini-batch's estimate, or a running average with
    ``scale_rule="running"``; restarted when the basis changes). ``natgrad.EKFAC(model)``
    uses :class:`EKFACConfig`'s defaults; EKFAC-NAG/-Adam/-RAdam of Xu 2021 are
    ``natgrad.build("ekfac+nag" | "ekfac+adam" | "ekfac+radam", model, lr=...)``.
    """

    config_class = EKFACConfig
    # These decide what each layer stores.
    fixed_fields = (*THINNING_FIELDS, *LOW_RANK_FIELDS)
    # build("ekfac", model): an input factor wider than 2048 as its top 128
    # eigenvectors plus one re-scaling per output direction on the rest; the conv
    # factors from 49 positions per sample (docs/defaults.md).
    recommended = {"statistics_positions": 49, "low_rank": 128}

    def make_curvature(self, shape, dtype, device) -> KroneckerFactors:
        return kronecker_factors(shape, dtype, device, self.config.statistics_positions)

    def make_inverse(self, shape, dtype, device) -> RescaledBasisInverse:
        return make_rescaled_inverse(self.config, shape, dtype, device)

    def sync_layers(self) -> None:
        sync_rescaling(self)
