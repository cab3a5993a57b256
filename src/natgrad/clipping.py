"""KL clipping (docs/math.md §2): ``ν = min(1, sqrt(κ / Σ_l η_l² ⟨Δ_l, ∇W̄_l⟩))``.

Each layer's learning rate ``η_l`` is read from the optimizer — the weight's and the
bias's, which may sit in groups of their own; ``.grad ← ν Δ``. When
clipping has bounded every one of the last :data:`CLIP_STREAK_WARNING` steps, the step
size no longer depends on the learning rate, and :class:`~natgrad.errors.ClippingWarning`
says so (once).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .errors import ClippingWarning
from .linalg import kl_clip_scale

__all__ = ["CLIP_STREAK_WARNING", "KLClipping", "kl_term", "learning_rates"]

#: Consecutive clipped steps after which :class:`ClippingWarning` is issued (once).
CLIP_STREAK_WARNING = 20


def learning_rates(
    optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module]
) -> dict[str, tuple[float, float | None]]:
    """``(η_W, η_b)`` per layer: the ``lr`` of the parameter groups holding each module's
    weight and bias (0 for a parameter in no group; ``η_b`` is ``None`` without a bias)."""
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[p] = group["lr"]
    out = {}
    for name, module in modules.items():
        bias = getattr(module, "bias", None)
        lr_bias = None if bias is None else float(lr_of.get(bias, 0.0))
        out[name] = (float(lr_of.get(module.weight, 0.0)), lr_bias)
    return out


def kl_term(delta: Tensor, grad: Tensor, lrs: tuple[float, float | None]) -> float:
    """``η_W² ⟨Δ_W, ∇W⟩ + η_b² ⟨Δ_b, ∇b⟩`` for ``Δ``, ``∇W̄`` ``(d_out, d_in')`` whose last
    column is the bias when ``η_b`` is given (``W̄ = [W, b]``)."""
    lr_w, lr_b = lrs
    if lr_b is None or lr_b == lr_w:
        return lr_w**2 * torch.dot(delta.reshape(-1), grad.reshape(-1)).item()
    weight = torch.sum(delta[:, :-1] * grad[:, :-1]).item()
    bias = torch.dot(delta[:, -1], grad[:, -1]).item()
    return lr_w**2 * weight + lr_b**2 * bias


class KLClipping:
    """Scales ``Δ`` by ``ν`` and watches how often it bounds the step.

    Attributes:
        scale: ``ν`` of the last step (1.0 when clipping is off or inactive).
        streak: consecutive steps with ``ν < 1``.
    """

    def __init__(self) -> None:
        self.scale = 1.0
        self.streak = 0
        self._warned = False

    def clip(
        self,
        kl_clip: float,
        deltas: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        lrs: Mapping[str, tuple[float, float | None]],
    ) -> dict[str, Tensor]:
        """``ν Δ`` for ``κ = kl_clip``, ``Δ_l`` and ``∇W̄_l`` ``(d_out, d_in')``, and each
        layer's ``(η_W, η_b)`` (:func:`learning_rates`)."""
        vdotg = sum(kl_term(deltas[name], grads[name], lrs[name]) for name in deltas)
        nu = kl_clip_scale(kl_clip, 1.0, vdotg)
        self._note(nu, kl_clip)
        if nu != 1.0:
            return {name: d * nu for name, d in deltas.items()}
        return dict(deltas)

    def _note(self, nu: float, kl_clip: float) -> None:
        self.scale = nu
        self.streak = self.streak + 1 if nu < 1.0 else 0
        if self.streak == CLIP_STREAK_WARNING and not self._warned:
            self._warned = True
            warnings.warn(
                f"KL clipping (kl_clip={kl_clip:g}) has scaled down each of the "
                f"last {CLIP_STREAK_WARNING} steps (last factor {nu:.3g}): the step size no "
                "longer depends on the learning rate. Raise kl_clip or damping, or lower the "
                "learning rate, if that is not intended.",
                ClippingWarning,
                stacklevel=4,
            )
