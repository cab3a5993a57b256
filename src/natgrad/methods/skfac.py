"""SKFAC (Tang et al. 2021): K-FAC whose factors are kept as low-rank batch matrices and
whose damped inverses are applied through Woodbury's identity (docs/math.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PreconditionerConfig, check_positive_int
from ..curvature import BatchMatrices
from ..curvature.batch_matrices import REDUCTIONS, check_reading
from ..inverses import WoodburyInverse
from ..preconditioner import Preconditioner

__all__ = ["SKFAC", "SKFACConfig"]


@dataclass(kw_only=True)
class SKFACConfig(PreconditionerConfig):
    """SKFAC's hyperparameters, defaults from Tang et al. 2021, §4: damping ``λ = 1e-3`` on
    each factor, ``T_cov = 20``, ``T_inv = 200``, Algorithm 2's factor scale. The paper
    gives no value for the moving average's weight (eqs. 26–27) nor a KL clip;
    ``decay = 0.95`` and ``kl_clip = 1e-3`` are K-FAC's defaults (docs/math.md §2).

    Tuning note: ``λ`` is added to *each* factor (docs/math.md §7), so directions outside
    the span of the ``m`` rows of both factors are damped by only ``λ²`` on the Kronecker
    product (K-FAC's factored damping gives ``λ``). When ``m < n`` the gradient has such
    components (always for convolutions under RS/SS, and for any layer once the rows are
    a running average). On the Fashion-MNIST CNN behind SGD-momentum (batch 128, lr 0.05,
    KL clip 1e-3) ``λ = 1e-2`` stalls at chance in either reading and ``λ = 0.1`` trains
    (docs/math.md §9.4). Raise ``damping`` when ``m ≪ n``.

    Attributes:
        reduction: for layers with several positions per sample (Conv2d):
            ``"reduce_sum"`` (RS, ``m = M`` rows) or ``"subsample"`` (SS,
            ``m = M·min(s', |T|)`` rows).
        spatial_samples: ``s'``, positions kept per sample by SS (>= 1; Tang et al. try
            {1, 2, 4, 8} on CIFAR-10 and use 1 on ImageNet).
        reading: the factors' scale (docs/math.md §7, §9.1): ``"algorithm2"`` (default:
            Algorithm 2 as written — raw spatial sums with ``MλI``, and the exact unreduced
            factor when the reduced row count reaches its size) or ``"kfc"`` (eqs. 10 and
            20: K-FAC's factors for convolutions, always the reduced rows). Set it at
            construction; a change by :meth:`~natgrad.Preconditioner.configure` applies
            from the next curvature update.
    """

    damping: float = 1e-3
    T_cov: int = 20
    T_inv: int = 200
    reduction: str = "reduce_sum"
    spatial_samples: int = 1
    reading: str = "algorithm2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        check_positive_int("spatial_samples", self.spatial_samples)
        check_reading(self.reading)


class SKFAC(Preconditioner):
    """SKFAC for ``nn.Linear`` and ``nn.Conv2d``:
    ``Δ = (λI + Y_GᵀY_G/m)⁻¹ ∇W̄ (λI + Y_AᵀY_A/m)⁻¹`` per layer.

    Curvature: :class:`~natgrad.curvature.BatchMatrices` (running ``Y_A``, ``Y_G`` with
    RS or SS rows; a batch of another size, e.g. the last of an epoch, updates the rows it
    has and leaves the others — see :func:`~natgrad.curvature.batch_matrices.blend_rows`).
    Inverse: :class:`~natgrad.inverses.WoodburyInverse` (``m × m`` Cholesky when
    ``m < n``; a direct inverse otherwise). ``natgrad.SKFAC(model)`` is SKFAC-RS;
    ``natgrad.SKFAC(model, reduction="subsample", spatial_samples=4)`` is SKFAC-SS.
    The positions SS draws come from a generator seeded from ``seed``.
    """

    config_class = SKFACConfig

    def make_curvature(self, shape, dtype, device) -> BatchMatrices:
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        return BatchMatrices(
            shape,
            dtype,
            device,
            reduction=self.config.reduction,
            samples=self.config.spatial_samples,
            seed=seed,
            reading=self.config.reading,
        )

    def make_inverse(self, shape, dtype, device) -> WoodburyInverse:
        return WoodburyInverse(dtype, device)

    def sync_layers(self) -> None:
        """A new ``reduction``, ``spatial_samples`` or ``reading`` applies from the next
        curvature update (the running rows change count by
        :func:`~natgrad.curvature.batch_matrices.blend_rows`' rule)."""
        for block in self.layers.values():
            block.curvature.reduction = self.config.reduction
            block.curvature.samples = self.config.spatial_samples
            block.curvature.reading = self.config.reading
