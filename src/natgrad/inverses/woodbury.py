"""SKFAC's inverse: each damped factor ``X = λI + YᵀY/m`` applied through Woodbury's
identity with an ``m × m`` Cholesky when ``m < n`` (docs/math.md, "SKFAC"; Tang et al.
2021, Theorem 1, eqs. 15–17, Algorithms 1–2).

``X⁻¹ = (1/λ)[I − Yᵀ K⁻¹ Y]`` with ``K = mλI + YYᵀ`` (``m × m``), so for a matrix ``V``

* left (the ``G`` side, ``V`` is ``(n, k)``): ``X⁻¹V = (V − Yᵀ K⁻¹ (Y V)) / λ``;
* right (the ``A`` side, ``V`` is ``(k, n)``): ``V X⁻¹ = (V − ((V Yᵀ) K⁻¹) Y) / λ``,

at cost ``O(m·n·k + m²k)`` per application after an ``O(m²n + m³)`` refresh; no ``n × n``
matrix is ever formed. ``K`` and its Cholesky factor are kept in at least float64: with a
small ``λ``, ``K``'s condition number ``(mλ + σ²_max)/(mλ)`` easily exceeds what float32
can factor, and at ``m × m`` the cost of double precision is negligible. When ``m ≥ n``
the Woodbury form saves nothing and ``X⁻¹`` is formed directly (``n × n``, Cholesky), as in
the paper's Algorithm 1; when ``m < n ≤ 2m`` it is formed from the ``m × m`` Cholesky,
because applying it is then cheaper (:class:`WoodburyInverse`). A factor the curvature
holds as a dense matrix (Algorithm 2's exact branch, ``BatchMatrices.X_A``/``X_G``) is
inverted directly: ``(λI + X)⁻¹``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..curvature import Curvature
from ..linalg import DecompositionError, damped_inverse, eye_like
from .base import InverseStrategy

__all__ = [
    "WoodburyInverse",
    "woodbury_kernel",
    "woodbury_cholesky",
    "woodbury_left",
    "woodbury_right",
    "gram_damped_inverse",
    "woodbury_explicit",
    "kernel_dtype",
]


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``K`` and its Cholesky factor: ``dtype`` promoted to float64."""
    return torch.promote_types(dtype, torch.float64)


def woodbury_kernel(Y: Tensor, damping: float) -> Tensor:
    """``K = mλI + YYᵀ`` (``(m, m)``, in :func:`kernel_dtype`) for ``Y`` of shape ``(m, n)``."""
    m = Y.shape[0]
    Y = Y.to(kernel_dtype(Y.dtype))
    K = Y @ Y.T
    K.diagonal().add_(m * damping)
    return K


def woodbury_cholesky(Y: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor ``L`` (``(m, m)``) of ``K = mλI + YYᵀ``.

    Raises:
        DecompositionError: ``K`` is not numerically positive definite or not finite.
    """
    L, info = torch.linalg.cholesky_ex(woodbury_kernel(Y, damping))
    if info.item() != 0 or not torch.isfinite(L).all():
        raise DecompositionError(
            f"Cholesky of the {Y.shape[0]}×{Y.shape[0]} Woodbury kernel failed "
            f"(damping {damping:g})"
        )
    return L


def _solve(L: Tensor, B: Tensor) -> Tensor:
    """``K⁻¹ B`` in ``L``'s precision, returned in ``B``'s dtype (``B`` is small: ``(m, k)``)."""
    return torch.cholesky_solve(B.to(L.dtype), L).to(B.dtype)


def woodbury_left(Y: Tensor, L: Tensor, damping: float, V: Tensor) -> Tensor:
    """``(λI + YᵀY/m)⁻¹ V = (V − Yᵀ K⁻¹ (Y V)) / λ`` for ``V`` of shape ``(n, k)``."""
    return torch.addmm(V, Y.T, _solve(L, Y @ V), beta=1.0 / damping, alpha=-1.0 / damping)


def woodbury_right(V: Tensor, Y: Tensor, L: Tensor, damping: float) -> Tensor:
    """``V (λI + YᵀY/m)⁻¹ = (V − ((V Yᵀ) K⁻¹) Y) / λ`` for ``V`` of shape ``(k, n)``."""
    return torch.addmm(V, _solve(L, (V @ Y.T).T).T, Y, beta=1.0 / damping, alpha=-1.0 / damping)


def woodbury_explicit(Y: Tensor, L: Tensor, damping: float) -> Tensor:
    """``(λI + YᵀY/m)⁻¹ = (I − Yᵀ K⁻¹ Y) / λ`` formed (``(n, n)``) from the ``m × m``
    Cholesky factor: ``O(m²n + m·n²)``, no ``n × n`` factorisation."""
    return woodbury_left(Y, L, damping, torch.eye(Y.shape[1], dtype=Y.dtype, device=Y.device))


def gram_damped_inverse(Y: Tensor, damping: float) -> Tensor:
    """``(λI + YᵀY/m)⁻¹`` formed directly (``(n, n)``) — the case ``m ≥ n``."""
    return damped_inverse(Y.T @ Y / Y.shape[0], damping)


class WoodburyInverse(InverseStrategy):
    """``Δ = (λI + G)⁻¹ ∇W̄ (λI + A)⁻¹`` with ``A = Y_AᵀY_A/m``, ``G = Y_GᵀY_G/m`` from a
    :class:`~natgrad.curvature.BatchMatrices` curvature; one damping ``λ`` on both
    factors (Tang et al. 2021, eq. 28), no factored split.

    Per factor (``Y`` is ``m × n``), :meth:`refresh` keeps

    * ``m ≥ n``: the dense inverse, by an ``n × n`` Cholesky (the paper's Algorithm 1);
    * ``m < n``: ``Y`` (a snapshot: the running rows move on between refreshes) and the
      Cholesky factor ``L`` of ``K = mλI + YYᵀ`` — when ``2m < n``. For ``m < n ≤ 2m``
      one application in factored form (``2·m·n·k``) costs more than with the explicit
      inverse (``n²·k``), so the inverse is formed from the same ``m × m`` Cholesky
      (:func:`woodbury_explicit`, ``O(m²n + mn²)``, no ``n × n`` factorisation); the
      ``n × n`` matrix then is at most ``2m × 2m``.

    The damping is fixed at each refresh (it is inside ``K``); :meth:`apply` uses that
    one, whatever it is passed. A new ``damping`` (``configure``) triggers a refresh.

    Attributes:
        Y_A, chol_A: ``(m, d_in')`` and ``(m, m)`` (float64) when ``2m < d_in'``, else
        ``None``; inv_A: ``(d_in', d_in')`` otherwise; the same for ``G``.
        damping: the ``λ`` of the last refresh.
    """

    _state_keys = ("Y_A", "chol_A", "inv_A", "Y_G", "chol_G", "inv_G", "damping")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.Y_A: Tensor | None = None
        self.chol_A: Tensor | None = None
        self.inv_A: Tensor | None = None
        self.Y_G: Tensor | None = None
        self.chol_G: Tensor | None = None
        self.inv_G: Tensor | None = None
        self.damping: float | None = None

    @property
    def ready(self) -> bool:
        # The tensors, not just the damping: under share="gradient" a worker receives the
        # owner's numbers (the damping) without its tensors.
        return self.damping is not None and (self.inv_A is not None or self.Y_A is not None)

    @staticmethod
    def _factor(Y: Tensor, damping: float) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(Y, L, None)`` (Woodbury) when ``2m < n``, else ``(None, None, X⁻¹)``."""
        m, n = Y.shape
        if m >= n:
            return None, None, gram_damped_inverse(Y, damping)
        L = woodbury_cholesky(Y, damping)
        if 2 * m < n:
            return Y.clone(), L, None
        return None, None, woodbury_explicit(Y, L, damping)

    @classmethod
    def _side(
        cls, Y: Tensor | None, X: Tensor | None, damping: float
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """A factor held as rows ``Y`` (:meth:`_factor`) or as the dense matrix ``X``."""
        if X is not None:
            return None, None, damped_inverse(X, damping)
        return cls._factor(Y, damping)

    def refresh(self, curvature: Curvature, damping: float) -> None:
        rows = curvature.batch_rows()
        if rows is None:
            raise TypeError(
                "WoodburyInverse needs a BatchMatrices curvature (or another whose "
                f"Curvature.batch_rows gives running Y_A, Y_G), got {type(curvature).__name__}"
            )
        Y_A, Y_G = rows
        X_A, X_G = curvature.dense_factors()
        A_side = self._side(Y_A, X_A, damping)
        G_side = self._side(Y_G, X_G, damping)
        self.Y_A, self.chol_A, self.inv_A = A_side
        self.Y_G, self.chol_G, self.inv_G = G_side
        self.damping = float(damping)

    def apply(self, grad: Tensor, damping: float) -> Tensor:
        """``(λI + G)⁻¹ ∇W̄ (λI + A)⁻¹`` for ``grad`` ``(d_out, d_in')``, ``λ`` of the last
        refresh."""
        lam = self.damping
        if self.inv_G is not None:
            out = self.inv_G @ grad
        else:
            out = woodbury_left(self.Y_G, self.chol_G, lam, grad)
        if self.inv_A is not None:
            return out @ self.inv_A
        return woodbury_right(out, self.Y_A, self.chol_A, lam)

    def dense(self, curvature: Curvature, damping: float) -> Tensor:
        """``(A + λI) ⊗ (G + λI)`` with ``A = Y_AᵀY_A/m``, ``G = Y_GᵀY_G/m`` and the ``λ``
        of the last refresh (the one :meth:`apply` uses)."""
        A, G = curvature.factors()
        lam = self.damping
        eye_A, eye_G = eye_like(A), eye_like(G)
        return torch.kron(A + lam * eye_A, G + lam * eye_G)

    def load_state_dict(self, state: dict[str, Any], *, partial: bool = False) -> None:
        """As :meth:`Stateful.load_state_dict`; ``m`` may differ from the current one, and
        the Cholesky factors keep their double precision."""
        missing = [k for k in self._state_keys if k not in state]
        if missing and not partial:
            raise KeyError(f"{type(self).__name__} state is missing {missing}")
        keys = [k for k in self._state_keys if k in state]
        saved = {key: getattr(self, key) for key in keys}
        for key in keys:
            setattr(self, key, None)
        chol = [k for k in ("chol_A", "chol_G") if k in state]
        try:
            super().load_state_dict({**state, **dict.fromkeys(chol)}, partial=partial)
            for key in chol:
                value = state[key]
                if value is not None:
                    value = value.to(device=self.device, dtype=kernel_dtype(self.dtype)).clone()
                setattr(self, key, value)
        except Exception:
            for key, value in saved.items():
                setattr(self, key, value)
            raise
