"""K-FAC's factored inverse with wide factors kept as low rank plus an isotropic rest
(docs/math.md §2, "Wide factors").

A wide PSD factor ``X`` (``n × n``) is replaced by

    X̃ = U diag(Λ) Uᵀ + r (I − U Uᵀ),     r = (tr X − Σ Λ) / (n − k)

with ``U`` ``(n, k)`` its top-``k`` eigenvectors and ``Λ`` their eigenvalues; ``r`` is the
mean of the other eigenvalues, so ``tr X̃ = tr X``. With shift ``φ``

    (X̃ + φI)⁻¹ = U diag(1/(Λ+φ)) Uᵀ + (I − U Uᵀ)/(r+φ)

is applied to a ``(d, n)`` matrix in ``2·n·k·d`` multiply–adds, without any ``n × n``
inverse. ``U`` and ``Λ`` come from randomized subspace iteration (Halko, Martinsson &
Tropp 2011, Algorithms 4.4 and 5.3), started from the previous refresh's ``U``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..config import is_wide
from ..curvature import Curvature
from ..linalg import DecompositionError, all_finite, damped_inverse, eye_like
from .factored import FactoredInverse, trace_pi

__all__ = [
    "LowRankFactoredInverse",
    "subspace_start",
    "top_eigenpairs",
    "warm_top_eigenpairs",
    "check_subspace_arguments",
    "trace_residual",
    "low_rank_apply_right",
    "low_rank_apply_left",
    "low_rank_dense",
]

#: Seed of the private generator that draws the start of the subspace iteration: the same
#: start on every run, and the global random stream is never touched.
START_SEED = 0


def subspace_start(n: int, p: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, p)`` Gaussian start block, drawn on the CPU from a private generator seeded
    with :data:`START_SEED` (the same block on any device, whatever the global RNG)."""
    generator = torch.Generator().manual_seed(START_SEED)
    return torch.randn(n, p, generator=generator, dtype=torch.float64).to(
        dtype=dtype, device=device
    )


def top_eigenpairs(X: Tensor, k: int, start: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs ``(Λ, U)`` of symmetric PSD ``X`` ``(n, n)``: ``Λ`` ``(k,)``
    descending (clamped at 0), ``U`` ``(n, k)`` orthonormal.

    Subspace iteration ``Q ← qr(X Q)`` ``iterations`` times (>= 1) from ``start``
    ``(n, p)``, ``k <= p <= n``, then Rayleigh–Ritz: the eigenpairs of ``Qᵀ X Q``
    ``(p, p)`` rotated back by ``Q``. Costs ``(iterations + 1)·n²·p`` for the products,
    ``O(n p²)`` for the QRs and ``O(p³)`` for the small eigendecomposition.

    Raises:
        DecompositionError: a decomposition failed or a result is not finite.
    """
    n, p = start.shape
    if not (1 <= k <= p <= n == X.shape[0]) or iterations < 1:
        raise ValueError(
            f"need 1 <= k <= p <= n and iterations >= 1, got k={k}, start {tuple(start.shape)}, "
            f"X {tuple(X.shape)}, iterations={iterations}"
        )
    try:
        Q = start
        for _ in range(iterations):
            Q = torch.linalg.qr(X @ Q).Q
        B = Q.T @ (X @ Q)
        ritz, S = torch.linalg.eigh((B + B.T) / 2)
    except RuntimeError as err:  # LAPACK did not converge (e.g. NaN entries)
        raise DecompositionError(f"subspace iteration failed: {err}") from err
    values = ritz[-k:].flip(0).clamp_min(0.0)
    U = Q @ S[:, -k:].flip(1)
    if not (all_finite(values) and all_finite(U)):
        raise DecompositionError("subspace iteration produced non-finite entries")
    return values, U


def check_subspace_arguments(**values: int) -> None:
    """Raise ``ValueError`` unless each of ``rank``, ``iterations``, ``warm_iterations``
    (given by keyword) is an integer >= 1 and ``above``, ``oversample`` integers >= 0."""
    for name, value in values.items():
        least = 0 if name in ("above", "oversample") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def warm_top_eigenpairs(
    X: Tensor,
    k: int,
    previous: Tensor | None,
    *,
    oversample: int,
    iterations: int,
    warm_iterations: int,
) -> tuple[Tensor, Tensor]:
    """:func:`top_eigenpairs` of ``X`` ``(n, n)`` with ``p = min(k + oversample, n)``
    columns: from :func:`subspace_start` and ``iterations`` iterations when ``previous``
    is ``None``, else from the previous refresh's ``U`` ``(n, k)`` in the first ``k``
    columns (the other ``p − k`` from the same random start) and ``warm_iterations``."""
    n = X.shape[0]
    start = subspace_start(n, min(k + oversample, n), X.dtype, X.device)
    if previous is not None:
        start[:, :k] = previous
        iterations = warm_iterations
    return top_eigenpairs(X, k, start, iterations)


def trace_residual(X: Tensor, values: Tensor) -> float:
    """``r = (tr X − Σ Λ) / (n − k)`` (clamped at 0): the mean eigenvalue outside the top
    ``k`` ``values``, so that ``tr X̃ = tr X``.

    Raises:
        DecompositionError: ``r`` is not finite.
    """
    n, k = X.shape[0], values.shape[0]
    r = (torch.trace(X) - values.sum()).item() / (n - k)
    if not math.isfinite(r):
        raise DecompositionError(f"residual eigenvalue is not finite ({r})")
    return max(r, 0.0)


def low_rank_apply_right(V: Tensor, U: Tensor, scale: Tensor, rest: float) -> Tensor:
    """``V (X̃ + φI)⁻¹ = V/(r+φ) + ((V U) ⊙ (1/(Λ+φ) − 1/(r+φ))) Uᵀ`` for ``V`` ``(d, n)``,
    ``U`` ``(n, k)``, ``scale = Λ + φ`` ``(k,)``, ``rest = r + φ``; ``2·n·k·d``."""
    coeff = scale.reciprocal() - 1.0 / rest
    return torch.addmm(V, (V @ U) * coeff, U.T, beta=1.0 / rest)


def low_rank_apply_left(U: Tensor, scale: Tensor, rest: float, V: Tensor) -> Tensor:
    """``(X̃ + φI)⁻¹ V`` for ``V`` ``(n, d)``: :func:`low_rank_apply_right` transposed (the
    inverse is symmetric)."""
    coeff = scale.reciprocal() - 1.0 / rest
    return torch.addmm(V, U, (U.T @ V) * coeff[:, None], beta=1.0 / rest)


def low_rank_dense(U: Tensor, scale: Tensor, rest: float) -> Tensor:
    """``X̃ + φI = U diag(Λ+φ) Uᵀ + (r+φ)(I − U Uᵀ)`` ``(n, n)``, formed (tests only)."""
    eye = eye_like(U)
    return (U * scale) @ U.T + rest * (eye - U @ U.T)


class LowRankFactoredInverse(FactoredInverse):
    """:class:`~natgrad.inverses.FactoredInverse` whose *wide* factors — ``A`` when
    ``d_in' > max(above, rank)``, ``G`` when ``d_out > max(above, rank)`` — are replaced by
    ``X̃`` (module docstring) before the same factored damping: ``Δ = G̃_d⁻¹ ∇W̄ Ã_d⁻¹``
    with ``Ã_d = Ã + π·sqrt(λ)·I``, ``G̃_d = G̃ + (sqrt(λ)/π)·I``; narrow factors are
    inverted exactly, by Cholesky.

    Args:
        shape: the layer's ``(d_out, d_in')``.
        rank: ``k`` (>= 1), eigenpairs kept per wide factor.
        above: factors wider than ``max(above, rank)`` are approximated.
        oversample: extra columns of the subspace iteration, ``p = min(k + oversample, n)``.
        iterations: subspace iterations of the first refresh (random start).
        warm_iterations: subspace iterations of later refreshes, started from the previous
            ``U`` (and ``p − k`` columns of the same random start).
        pi: the damping split (:func:`~natgrad.inverses.trace_pi` by default).

    Attributes:
        A_inv, G_inv: the exact damped inverses of narrow factors (``None`` for wide ones).
        A_basis, G_basis: ``U`` ``(n, k)`` of a wide factor (``None`` for narrow ones).
        A_scale, G_scale: ``Λ + φ`` ``(k,)``; A_rest, G_rest: ``r + φ``.
    """

    _state_keys = (
        "A_inv",
        "G_inv",
        "A_basis",
        "A_scale",
        "A_rest",
        "G_basis",
        "G_scale",
        "G_rest",
    )

    def __init__(
        self,
        *args,
        shape: tuple[int, int],
        rank: int,
        above: int = 2048,
        oversample: int = 16,
        iterations: int = 3,
        warm_iterations: int = 1,
        pi: Callable[[Tensor, Tensor], float] = trace_pi,
        **kwargs,
    ) -> None:
        super().__init__(*args, pi=pi, **kwargs)
        check_subspace_arguments(
            rank=rank,
            above=above,
            oversample=oversample,
            iterations=iterations,
            warm_iterations=warm_iterations,
        )
        self.rank, self.above, self.oversample = rank, above, oversample
        self.iterations, self.warm_iterations = iterations, warm_iterations
        d_out, d_in = shape
        self.wide_A, self.wide_G = (self.is_wide(d_in), self.is_wide(d_out))
        self.A_basis: Tensor | None = None
        self.A_scale: Tensor | None = None
        self.A_rest: float | None = None
        self.G_basis: Tensor | None = None
        self.G_scale: Tensor | None = None
        self.G_rest: float | None = None

    def is_wide(self, n: int) -> bool:
        """Whether a factor of size ``n`` is approximated: ``n > max(above, rank)``."""
        return is_wide(n, self.rank, self.above)

    @property
    def ready(self) -> bool:
        return self.A_inv is not None or self.A_basis is not None

    def refresh(self, curvature: Curvature, damping: float) -> None:
        A, G = curvature.factors()
        pi = self.pi(A, G)
        root = math.sqrt(damping)
        # Every side is computed before any is stored: a failure changes nothing.
        A_side = self._side(A, pi * root, self.wide_A, self.A_basis)
        G_side = self._side(G, root / pi, self.wide_G, self.G_basis)
        self.A_inv, self.A_basis, self.A_scale, self.A_rest = A_side
        self.G_inv, self.G_basis, self.G_scale, self.G_rest = G_side

    def _side(self, X: Tensor, shift: float, wide: bool, previous: Tensor | None) -> tuple:
        """``(inverse, basis, scale, rest)`` of one damped factor; the unused ones ``None``."""
        if not wide:
            return damped_inverse(X, shift), None, None, None
        values, U = warm_top_eigenpairs(
            X,
            self.rank,
            previous,
            oversample=self.oversample,
            iterations=self.iterations,
            warm_iterations=self.warm_iterations,
        )
        rest = trace_residual(X, values) + shift
        return None, U, values + shift, rest

    def apply(self, grad: Tensor, damping: float) -> Tensor:
        if self.G_basis is None:
            left = self.G_inv @ grad
        else:
            left = low_rank_apply_left(self.G_basis, self.G_scale, self.G_rest, grad)
        if self.A_basis is None:
            return left @ self.A_inv
        return low_rank_apply_right(left, self.A_basis, self.A_scale, self.A_rest)

    def refresh_cost(self, shape: tuple[int, int]) -> float:
        """``n³`` per narrow factor, ``(warm_iterations + 1)·n²·p`` per wide one (the
        products of a warm-started refresh; the first refresh's extra iterations are left
        out, the assignment being fixed for the whole run)."""
        cost = 0.0
        for n in shape:
            p = min(self.rank + self.oversample, n)
            cost += (self.warm_iterations + 1) * float(n) ** 2 * p if self.is_wide(n) else n**3
        return cost

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """``Ã_d ⊗ G̃_d``: narrow factors damped from the curvature's current ones (as
        :class:`FactoredInverse`), wide ones ``X̃ + φI`` from the stored ``U``, ``Λ``, ``r``
        and shift of the last refresh."""
        A, G = curvature.factors()
        pi, root = self.pi(A, G), math.sqrt(damping)
        if self.A_basis is None:
            A_d = A + pi * root * eye_like(A)
        else:
            A_d = low_rank_dense(self.A_basis, self.A_scale, self.A_rest)
        if self.G_basis is None:
            G_d = G + root / pi * eye_like(G)
        else:
            G_d = low_rank_dense(self.G_basis, self.G_scale, self.G_rest)
        return torch.kron(A_d, G_d)
