"""SKFAC's low-rank curvature: running averages of the batch matrices ``Y_A``, ``Y_G``
themselves, never the ``n × n`` factors (docs/math.md, "SKFAC"; Tang et al. 2021, §3,
eqs. 13–27, Algorithms 1–2).

Each factor is represented by a matrix ``Y`` of ``m`` rows with ``X = YᵀY/m`` (or, in one
branch of Algorithm 2, by ``X`` itself). Write a factor as a sum over positions of
per-position rows ``r_{i,t}``: ``r = ā`` for ``A`` and ``r = g`` (or ``g/sqrt(|T|)``) for
``G``. Two readings of the paper's scale, selected by ``reading``:

``"kfc"`` — the rows estimate the factors of eq. (10), K-FAC's convention for convolutions
(``A = (1/M) Σ_i Σ_t ā ā ᵀ``, ``G = (1/(M|T|)) Σ_i Σ_t g gᵀ``), so ``r_G = g/sqrt(|T|)``:

* **Reduce-Sum** (eqs. 20–24): one row ``Σ_t r_{i,t} / sqrt(|T|)`` per sample, ``m = M``;
  ``YᵀY/m = (1/M) Σ_i (Σ_t r)(Σ_t r)ᵀ/|T|`` — eq. (20)'s approximation
  ``Σ_t r rᵀ ≈ (1/|T|)(Σ_t r)(Σ_t r)ᵀ``.
* **Spatial Subsampling** (eqs. 18–19): ``s = min(s', |T|)`` positions drawn uniformly
  without replacement, rows ``sqrt(|T|) · r_{i,t}``, ``m = M·s``. A uniform ``s``-subset
  ``T'`` has ``E[Σ_{t∈T'} r rᵀ] = (s/|T|) Σ_t r rᵀ``, so ``YᵀY/m`` is unbiased for the
  factor and equals it when ``s = |T|``.
* The reduced rows are always used, whatever ``m`` and ``n``.

``"algorithm2"`` — Algorithm 2 as written: raw rows (``r_G = g``), kernels ``MλI + YYᵀ``
with the batch size ``M`` (lines 8 and 17), so the factor is ``λI + ỸᵀỸ/M`` for the
reduced rows ``Ỹ``:

* **Reduce-Sum**: ``Ỹ_i = Σ_t r_{i,t}`` (line 7), ``X = (1/M) Σ_i (Σ_t r)(Σ_t r)ᵀ`` —
  ``|T|`` times the ``"kfc"`` ``A`` and ``|T|²`` times its ``G``.
* **Spatial Subsampling**: the drawn raw rows, ``X = (1/M) Σ_i Σ_{t∈T'_i} r rᵀ`` (stored as
  rows ``sqrt(s)·r`` so that ``YᵀY/m`` with ``m = M·s`` is that matrix).
* **Exact branch** (lines 3–4 and 13–14): when the reduced row count ``m`` (``M``, or
  ``M·s``) is at least ``n``, the factor is the unreduced ``(1/M) Σ_i Σ_t r rᵀ`` over every
  position. It is kept as an ``n × n`` running average (:attr:`BatchMatrices.X_A`,
  ``X_G``) rather than as ``M·|T|`` running rows — the paper averages rows (eqs. 26–27)
  but states that average for the Woodbury forms; ``n ≤ m`` makes this matrix no larger
  than the Woodbury kernel. Which branch a factor takes is fixed by the first batch it
  sees (so a short last batch does not switch it).

For a layer with one position per sample (``nn.Linear``) both readings give the plain rows
``Y_A = [ā_i]``, ``Y_G = [g_i]`` (Algorithm 1) and ``YᵀY/M`` *is* K-FAC's ``A``, ``G``.

Running average (eqs. 26–27): ``Y ← ε Y + (1−ε) Y_batch`` (``ε`` = ``decay``; the paper's
``α`` is ``1−ε``), rows aligned by their position in the batch. Averaging rows rather than
Gram matrices is the paper's choice; rows of independent batches partly cancel, so for a
zero-mean component the Gram of the averaged ``Y`` is ``≈ (1−ε)/(1+ε)`` times that of one
batch (the mean component is kept in full) — the damping then weighs more.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..capture import LayerStats
from ..linalg import gram, running_average
from .base import Curvature, check_finite

__all__ = [
    "REDUCTIONS",
    "SKFAC_READINGS",
    "exact_factors",
    "BatchMatrices",
    "reduce_sum_rows",
    "sample_positions",
    "subsample_rows",
    "batch_matrices",
    "blend_rows",
]

#: Spatial row reductions for layers with several positions per sample.
REDUCTIONS = ("reduce_sum", "subsample")
#: Readings of the factors' scale (module docstring).
SKFAC_READINGS = ("algorithm2", "kfc")


def check_reading(reading: str) -> None:
    """Raise ``ValueError`` unless ``reading`` is one of :data:`SKFAC_READINGS`."""
    if reading not in SKFAC_READINGS:
        raise ValueError(f"reading must be one of {SKFAC_READINGS}, got {reading!r}")


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


def subsample_rows(r: Tensor, index: Tensor, scale: float | None = None) -> Tensor:
    """Spatial Subsampling: rows ``scale · r_{i,t}`` for ``t`` in ``index[i]``,
    ``(M, P, n)`` and ``(M, s)`` → ``(M·s, n)``, sample-major. The default
    ``scale = sqrt(|T|)`` makes ``YᵀY/m`` (``m = M·s``) unbiased for
    ``(1/M) Σ_i Σ_t r rᵀ``; Algorithm 2's raw rows with ``MλI`` are ``scale = sqrt(s)``."""
    m, p, n = r.shape
    s = index.shape[1]
    picked = torch.gather(r, 1, index.to(r.device).unsqueeze(-1).expand(m, s, n))
    return picked.reshape(m * s, n).mul_(math.sqrt(p) if scale is None else scale)


def _position_rows(stats: LayerStats, reading: str) -> tuple[Tensor, Tensor]:
    """Per-position rows ``(r_A, r_G)`` ``(M, P, n)``: ``g/sqrt(|T|)`` under ``"kfc"``
    (eq. 10's ``1/(M|T|)``), the raw ``g`` under ``"algorithm2"``."""
    if reading == "kfc":
        return stats.a, stats.g / math.sqrt(stats.a.shape[1])
    return stats.a, stats.g


def batch_matrices(
    stats: LayerStats,
    reduction: str = "reduce_sum",
    samples: int = 1,
    generator: torch.Generator | None = None,
    reading: str = "kfc",
) -> tuple[Tensor, Tensor]:
    """One batch's reduced ``(Y_A, Y_G)``, each ``(m, n)``, with ``YᵀY/m`` the factors of
    ``reading`` (module docstring). ``reduction`` is ``"reduce_sum"`` (``m = M``) or
    ``"subsample"`` (``m = M·min(samples, |T|)``)."""
    check_reading(reading)
    r_a, r_g = _position_rows(stats, reading)
    p = r_a.shape[1]
    if p == 1:
        return r_a[:, 0].clone(), r_g[:, 0].clone()
    if reduction == "reduce_sum":
        if reading == "kfc":
            return reduce_sum_rows(r_a), reduce_sum_rows(r_g)
        return r_a.sum(dim=1), r_g.sum(dim=1)
    if reduction == "subsample":
        index = sample_positions(r_a.shape[0], p, samples, generator)
        scale = None if reading == "kfc" else math.sqrt(index.shape[1])
        return subsample_rows(r_a, index, scale), subsample_rows(r_g, index, scale)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def exact_factors(stats: LayerStats) -> tuple[Tensor, Tensor]:
    """Algorithm 2's unreduced factors ``(1/M) Σ_i Σ_t ā āᵀ`` and ``(1/M) Σ_i Σ_t g gᵀ``
    (raw rows, no ``1/|T|``): ``(d_in', d_in')`` and ``(d_out, d_out)``."""
    a, g = stats.a, stats.g
    m = a.shape[0]
    return gram(a.reshape(-1, a.shape[-1])).div_(m), gram(g.reshape(-1, g.shape[-1])).div_(m)


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
    ``≈ (Y_AᵀY_A/m) ⊗ (Y_GᵀY_G/m)``. Under ``reading="algorithm2"`` a factor of a layer
    with several positions whose reduced row count is at least its size is kept as the
    unreduced matrix ``X_A`` (``(d_in', d_in')``) or ``X_G`` instead (module docstring).

    Args:
        shape, dtype, device: as :class:`~natgrad.curvature.Curvature`.
        reduction: ``"reduce_sum"`` or ``"subsample"`` (layers with ``|T| > 1``).
        samples: ``s'``, positions kept per sample by ``"subsample"`` (>= 1).
        seed: seed of the generator that draws the subsampled positions; its state is
            part of :meth:`state_dict`, so a resumed run draws the same positions.
        reading: ``"kfc"`` or ``"algorithm2"`` (module docstring).

    Batches of another size than the running matrices: see :func:`blend_rows`.
    """

    _state_keys = ("Y_A", "Y_G", "X_A", "X_G", "rng_state")

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        reduction: str = "reduce_sum",
        samples: int = 1,
        seed: int = 0,
        reading: str = "kfc",
    ) -> None:
        super().__init__(shape, dtype, device)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples (s') must be an integer >= 1, got {samples!r}")
        check_reading(reading)
        self.reduction = reduction
        self.samples = samples
        self.reading = reading
        self.generator = torch.Generator().manual_seed(seed)
        self.Y_A: Tensor | None = None
        self.Y_G: Tensor | None = None
        self.X_A: Tensor | None = None
        self.X_G: Tensor | None = None

    @property
    def rng_state(self) -> Tensor:
        return self.generator.get_state()

    @rng_state.setter
    def rng_state(self, state: Tensor) -> None:
        self.generator.set_state(state.cpu())

    @property
    def initialized(self) -> bool:
        return self.Y_A is not None or self.X_A is not None

    @property
    def rows(self) -> int:
        """``m``, the number of rows of the running matrices (0 before the first batch or
        when both factors are exact)."""
        Y = self.Y_A if self.Y_A is not None else self.Y_G
        return 0 if Y is None else Y.shape[0]

    def _exact_sides(self, positions: int, reduced_rows: int) -> tuple[bool, bool]:
        """Whether ``A`` and ``G`` take Algorithm 2's exact branch: a factor already held
        keeps its form; a new one is exact under ``"algorithm2"`` when the layer has
        several positions and ``m ≥ n``."""
        d_out, d_in = self.shape
        sides = []
        for Y, X, n in ((self.Y_A, self.X_A, d_in), (self.Y_G, self.X_G, d_out)):
            if X is not None or Y is not None:
                sides.append(X is not None)
            else:
                sides.append(
                    self.reading == "algorithm2" and positions > 1 and reduced_rows >= n
                )
        return sides[0], sides[1]

    def _fold(
        self, Y_A: Tensor, Y_G: Tensor, X_A: Tensor | None, X_G: Tensor | None, decay: float
    ) -> None:
        """Running averages: ``X`` for an exact side, rows (:func:`blend_rows`) otherwise."""
        if X_A is not None:
            self.X_A = running_average(self.X_A, X_A, decay)
        else:
            self.Y_A = blend_rows(self.Y_A, Y_A, decay)
        if X_G is not None:
            self.X_G = running_average(self.X_G, X_G, decay)
        else:
            self.Y_G = blend_rows(self.Y_G, Y_G, decay)

    def _batch(
        self, stats: LayerStats, reduced_rows: int, index: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """This batch's rows (Spatial Subsampling at ``index`` when given, else drawn from
        the generator), and the exact factors of the sides that take that branch."""
        if index is None:
            Y_A, Y_G = batch_matrices(
                stats, self.reduction, self.samples, self.generator, self.reading
            )
        else:
            r_a, r_g = _position_rows(stats, self.reading)
            scale = None if self.reading == "kfc" else math.sqrt(index.shape[1])
            Y_A, Y_G = subsample_rows(r_a, index, scale), subsample_rows(r_g, index, scale)
        exact_A, exact_G = self._exact_sides(stats.positions, reduced_rows)
        X_A = X_G = None
        if exact_A or exact_G:
            full_A, full_G = exact_factors(stats)
            X_A, X_G = (full_A if exact_A else None), (full_G if exact_G else None)
        check_finite(*(t for t in (Y_A, Y_G, X_A, X_G) if t is not None))
        return Y_A, Y_G, X_A, X_G

    def _reduced_rows(self, batch_size: int, positions: int) -> int:
        if positions > 1 and self.reduction == "subsample":
            return batch_size * min(self.samples, positions)
        return batch_size

    def update(self, stats: LayerStats, decay: float) -> None:
        state = self.generator.get_state()
        stats = stats.to(self.dtype)
        try:
            batch = self._batch(stats, self._reduced_rows(stats.batch_size, stats.positions))
        except ArithmeticError:
            self.generator.set_state(state)
            raise
        self._fold(*batch, decay)

    def update_across(self, stats: LayerStats, decay: float, comm) -> None:
        """:meth:`update` for a batch split over data-parallel workers (docs/distributed.md):
        the global batch's rows are every worker's rows in rank order, so ``Y_batch`` is
        all-gathered (``m`` grows with the number of workers) — only ``Y`` travels, never an
        ``n × n`` factor (Tang et al. 2021, §3.3). Spatial Subsampling draws the positions
        of the whole global batch from the shared generator and keeps this worker's share,
        so the drawn positions (and the generator's state) are those of one process on the
        whole batch. An exact-branch factor (``"algorithm2"``) is a sample mean: its
        global value is the batch-size-weighted mean of the workers' ones.
        """
        sizes = comm.batch_sizes(stats.batch_size)
        offset = sum(sizes[: comm.rank])
        reduced_rows = self._reduced_rows(sum(sizes), stats.positions)

        def local() -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
            rows = stats.to(self.dtype)
            index = None
            if self.reduction == "subsample" and rows.positions > 1:
                index = sample_positions(sum(sizes), rows.positions, self.samples, self.generator)
                index = index[offset : offset + rows.batch_size]
            return self._batch(rows, reduced_rows, index)

        Y_A, Y_G, X_A, X_G = comm.agree(self, local)  # restores the generator on failure
        exact = [X for X in (X_A, X_G) if X is not None]
        means = iter(comm.weighted_mean(exact, stats.batch_size)) if exact else iter(())
        X_A = next(means) if X_A is not None else None
        X_G = next(means) if X_G is not None else None
        Y_A = comm.all_gather_rows(Y_A) if X_A is None else Y_A
        Y_G = comm.all_gather_rows(Y_G) if X_G is None else Y_G
        self._fold(Y_A, Y_G, X_A, X_G, decay)

    def factors(self) -> tuple[Tensor, Tensor]:
        """Dense ``(A, G)``: ``YᵀY/m`` of the rows (or the exact ``X``) — formed here on
        request, for introspection only; SKFAC's step never forms them from rows."""
        A = self.X_A if self.X_A is not None else self.Y_A.T @ self.Y_A / self.Y_A.shape[0]
        G = self.X_G if self.X_G is not None else self.Y_G.T @ self.Y_G / self.Y_G.shape[0]
        return A, G

    def batch_rows(self) -> tuple[Tensor | None, Tensor | None]:
        """The running ``(Y_A, Y_G)``; a side held as a dense factor (Algorithm 2's exact
        branch) is ``None`` here and given by :meth:`dense_factors`."""
        return self.Y_A, self.Y_G

    def dense_factors(self) -> tuple[Tensor | None, Tensor | None]:
        """``(X_A, X_G)``: the sides held as dense factors, ``None`` for those held as rows."""
        return self.X_A, self.X_G

    def load_state_dict(self, state: dict[str, Any], *, partial: bool = False) -> None:
        """As :meth:`Stateful.load_state_dict`; ``m`` may differ from the current one, and a
        checkpoint written before the exact branch existed (no ``X_A``) loads as rows."""
        if not partial:
            state = {"X_A": None, "X_G": None, **state}
        keys = [k for k in ("Y_A", "Y_G", "X_A", "X_G") if k in state]
        saved = {k: getattr(self, k) for k in keys}
        for k in keys:
            setattr(self, k, None)
        try:
            super().load_state_dict(state, partial=partial)
        except Exception:
            for k, value in saved.items():
                setattr(self, k, value)
            raise
