"""SKFAC's low-rank curvature: running averages of the batch matrices ``Y_A``, ``Y_G``
themselves, never the ``n × n`` factors (MATH.md, SKFAC; ``003_…`` §3, eqs. 13–27).

Each factor is represented by a matrix ``Y`` of ``m`` rows with ``X = YᵀY/m``. The rows are
built so that ``YᵀY/m`` estimates K-FAC's factor *in MATH.md's convention*
(``A = (1/M) Σ_i Σ_t ā ā ᵀ``, ``G = (1/(M|T|)) Σ_i Σ_t g gᵀ``). Write both as
``X = (1/M) Σ_i Σ_t r_{i,t} r_{i,t}ᵀ`` with per-position rows ``r = ā`` for ``A`` and
``r = g/sqrt(|T|)`` for ``G``; then, per sample ``i``:

* **Reduce-Sum** (``003_…`` eqs. 20–24): one row ``Σ_t r_{i,t} / sqrt(|T|)``, ``m = M``.
  ``YᵀY/m = (1/M) Σ_i (Σ_t r)(Σ_t r)ᵀ/|T|`` — the paper's approximation
  ``Σ_t r rᵀ ≈ (1/|T|)(Σ_t r)(Σ_t r)ᵀ``. For ``A`` the row is the paper's
  ``Ā/sqrt(|T|)``; for ``G`` it carries one more ``1/sqrt(|T|)`` (the row is the mean of
  ``g`` over positions), because MATH.md's ``G`` is a mean over positions — SKFAC damps
  each factor separately, so the ``1/|T|`` would not cancel (MATH.md, K-FAC).
* **Spatial Subsampling** (``003_…`` eqs. 18–19): ``s = min(s', |T|)`` positions drawn
  uniformly without replacement, rows ``sqrt(|T|) · r_{i,t}``, ``m = M·s``. Since a
  uniform ``s``-subset ``T'`` has ``E[Σ_{t∈T'} r rᵀ] = (s/|T|) Σ_t r rᵀ``,
  ``YᵀY/m = (|T|/(M·s)) Σ_i Σ_{t∈T'_i} r rᵀ`` is unbiased for ``X``, and equals it exactly
  when ``s = |T|``. For ``G`` the rows are the plain ``g`` and ``m = M·s``: eq. 19's
  ``(M|T'|λI + ỸỸᵀ)`` exactly. For ``A`` the ``sqrt(|T|)`` corrects eq. 18, whose
  ``(MλI + ÃÃᵀ)`` with plain rows estimates ``(s/|T|)·A``.
  ``A`` and ``G`` use the same drawn positions.

For a layer with one position per sample (``nn.Linear``), both give the plain rows
``Y_A = [ā_i]``, ``Y_G = [g_i]`` and ``YᵀY/M`` *is* K-FAC's ``A``, ``G``.

Running average (eqs. 26–27): ``Y ← ε Y + (1−ε) Y_batch`` (``ε`` = ``decay``; the paper's
``α`` is ``1−ε``), rows aligned by their position in the batch. Averaging rows rather than
Gram matrices is the paper's choice; note that rows of independent batches partly cancel,
so for a zero-mean component the Gram of the averaged ``Y`` is ``≈ (1−ε)/(1+ε)`` times that
of one batch (the mean component is kept in full) — the damping then weighs more.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..capture import LayerStats
from .base import Curvature, check_finite

__all__ = [
    "REDUCTIONS",
    "BatchMatrices",
    "reduce_sum_rows",
    "sample_positions",
    "subsample_rows",
    "batch_matrices",
    "blend_rows",
]

#: Spatial row reductions for layers with several positions per sample.
REDUCTIONS = ("reduce_sum", "subsample")


def reduce_sum_rows(r: Tensor) -> Tensor:
    """Reduce-Sum: ``Σ_t r_{i,t} / sqrt(|T|)`` per sample, ``(M, P, n) → (M, n)``."""
    return r.sum(dim=1).div_(math.sqrt(r.shape[1]))


def sample_positions(
    batch_size: int, positions: int, samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Indices ``(M, s)`` of ``s = min(samples, positions)`` distinct positions per sample,
    uniform without replacement, drawn on the CPU from ``generator``."""
    s = min(samples, positions)
    keys = torch.rand(batch_size, positions, generator=generator)
    return keys.argsort(dim=1)[:, :s]


def subsample_rows(r: Tensor, index: Tensor) -> Tensor:
    """Spatial Subsampling: rows ``sqrt(|T|) · r_{i,t}`` for ``t`` in ``index[i]``,
    ``(M, P, n)`` and ``(M, s)`` → ``(M·s, n)``, sample-major (with ``m = M·s`` rows,
    ``YᵀY/m`` is unbiased for ``(1/M) Σ_i Σ_t r rᵀ``)."""
    m, p, n = r.shape
    s = index.shape[1]
    picked = torch.gather(r, 1, index.to(r.device).unsqueeze(-1).expand(m, s, n))
    return picked.reshape(m * s, n).mul_(math.sqrt(p))


def batch_matrices(
    stats: LayerStats,
    reduction: str = "reduce_sum",
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One batch's ``(Y_A, Y_G)``, each ``(m, n)``, with ``YᵀY/m`` estimating MATH.md's
    ``A`` and ``G`` (module docstring). ``reduction`` is ``"reduce_sum"`` (``m = M``) or
    ``"subsample"`` (``m = M·min(samples, |T|)``)."""
    a, g = stats.a, stats.g
    p = a.shape[1]
    r_g = g / math.sqrt(p)
    if p == 1:
        return a[:, 0].clone(), r_g[:, 0].clone()
    if reduction == "reduce_sum":
        return reduce_sum_rows(a), reduce_sum_rows(r_g)
    if reduction == "subsample":
        index = sample_positions(a.shape[0], p, samples, generator)
        return subsample_rows(a, index), subsample_rows(r_g, index)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def blend_rows(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """``Y ← ε Y + (1−ε) Y_batch`` with rows aligned by position, for any two row counts.

    Rows present in both are blended; rows only in the batch (a larger batch, or the first
    one) are taken as they are, as a first batch would be; rows only in the running matrix
    (a smaller batch, e.g. the last of an epoch) are kept unchanged — decaying them with no
    new rows would shrink the estimate. So every row stays an average of real rows, and
    ``m`` is the largest row count seen.
    """
    if old is None:
        return new.clone()
    k = min(old.shape[0], new.shape[0])
    out = old.clone() if old.shape[0] >= new.shape[0] else torch.cat([old, new[k:]])
    out[:k].mul_(decay).add_(new[:k], alpha=1.0 - decay)
    return out


class BatchMatrices(Curvature):
    """Running ``Y_A`` (``(m, d_in')``) and ``Y_G`` (``(m, d_out)``); the block is
    ``≈ (Y_AᵀY_A/m) ⊗ (Y_GᵀY_G/m)``.

    Args:
        shape, dtype, device: as :class:`~natgrad.curvature.Curvature`.
        reduction: ``"reduce_sum"`` or ``"subsample"`` (layers with ``|T| > 1``).
        samples: ``s'``, positions kept per sample by ``"subsample"`` (>= 1).
        seed: seed of the generator that draws the subsampled positions; its state is
            part of :meth:`state_dict`, so a resumed run draws the same positions.

    Batches of another size than the running matrices: see :func:`blend_rows`.
    """

    _state_keys = ("Y_A", "Y_G", "rng_state")

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        reduction: str = "reduce_sum",
        samples: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(shape, dtype, device)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples (s') must be an integer >= 1, got {samples!r}")
        self.reduction = reduction
        self.samples = samples
        self.generator = torch.Generator().manual_seed(seed)
        self.Y_A: Tensor | None = None
        self.Y_G: Tensor | None = None

    @property
    def rng_state(self) -> Tensor:
        return self.generator.get_state()

    @rng_state.setter
    def rng_state(self, state: Tensor) -> None:
        self.generator.set_state(state.cpu())

    @property
    def initialized(self) -> bool:
        return self.Y_A is not None

    @property
    def rows(self) -> int:
        """``m``, the number of rows of the running matrices (0 before the first batch)."""
        return 0 if self.Y_A is None else self.Y_A.shape[0]

    def update(self, stats: LayerStats, decay: float) -> None:
        state = self.generator.get_state()
        Y_A, Y_G = batch_matrices(
            stats.to(self.dtype), self.reduction, self.samples, self.generator
        )
        try:
            check_finite(Y_A, Y_G)
        except ArithmeticError:
            self.generator.set_state(state)
            raise
        self.Y_A = blend_rows(self.Y_A, Y_A, decay)
        self.Y_G = blend_rows(self.Y_G, Y_G, decay)

    def update_across(self, stats: LayerStats, decay: float, comm) -> None:
        """:meth:`update` for a batch split over data-parallel workers (docs/distributed.md):
        the global batch's rows are every worker's rows in rank order, so ``Y_batch`` is
        all-gathered (``m`` grows with the number of workers) — only ``Y`` travels, never an
        ``n × n`` factor (``003_…``). Spatial Subsampling draws the positions of the whole
        global batch from the shared generator and keeps this worker's share, so the drawn
        positions (and the generator's state) are those of one process on the whole batch.
        """
        sizes = comm.batch_sizes(stats.batch_size)
        offset = sum(sizes[: comm.rank])

        def local() -> tuple[Tensor, Tensor]:
            rows = stats.to(self.dtype)
            if self.reduction == "subsample" and rows.positions > 1:
                index = sample_positions(sum(sizes), rows.positions, self.samples, self.generator)
                index = index[offset : offset + rows.batch_size]
                r_g = rows.g / math.sqrt(rows.positions)
                Y_A, Y_G = subsample_rows(rows.a, index), subsample_rows(r_g, index)
            else:
                Y_A, Y_G = batch_matrices(rows, self.reduction, self.samples, self.generator)
            check_finite(Y_A, Y_G)
            return Y_A, Y_G

        Y_A, Y_G = comm.agree(self, local)  # restores the generator if any worker failed
        self.Y_A = blend_rows(self.Y_A, comm.all_gather_rows(Y_A), decay)
        self.Y_G = blend_rows(self.Y_G, comm.all_gather_rows(Y_G), decay)

    def factors(self) -> tuple[Tensor, Tensor]:
        """Dense ``(Y_AᵀY_A/m, Y_GᵀY_G/m)`` — formed here on request, for introspection
        only; SKFAC's step never forms them."""
        return self.Y_A.T @ self.Y_A / self.rows, self.Y_G.T @ self.Y_G / self.rows

    def batch_rows(self) -> tuple[Tensor, Tensor]:
        """The running ``(Y_A, Y_G)``."""
        return self.Y_A, self.Y_G

    def load_state_dict(self, state: dict[str, Any], *, partial: bool = False) -> None:
        """As :meth:`Stateful.load_state_dict`; ``m`` may differ from the current one."""
        saved = self.Y_A, self.Y_G
        self.Y_A = self.Y_G = None
        try:
            super().load_state_dict(state, partial=partial)
        except Exception:
            self.Y_A, self.Y_G = saved
            raise
