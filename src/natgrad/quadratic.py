"""The local quadratic model of the loss (Martens & Grosse 2015, §6.5 and §7).

Around the parameters ``θ`` of one step, on that step's batch,

    M(δ) = ∇hᵀδ + ½ δᵀ (C + λI) δ,

with ``h`` the batch loss, ``C`` its Gauss–Newton matrix ``(1/M) Σ_i J_iᵀ H_i J_i``
(``J_i`` the Jacobian of sample ``i``'s network output in the parameters, ``H_i`` the
Hessian of its loss in the output; for the categorical and Gaussian likelihoods this is
also the Fisher) and ``λ`` the damping. Curvature–vector products are exact: ``J v`` by
forward-mode automatic differentiation through the model (one extra forward pass per
direction), then ``(J u)ᵀ H (J v)`` in closed form in the output space.

Two uses (:mod:`natgrad.adaptive`): the step size ``α*`` (and momentum ``μ*``) that
minimise ``M`` along the preconditioned direction (and the previous update), and the
reduction ratio ``ρ = (h(θ+δ) − h(θ)) / M(δ)`` that drives Levenberg–Marquardt damping.

What it needs from the training loop is only what the model already sees: a
:class:`ModelTap` records the root model's inputs, outputs and the gradient of the loss
in the outputs. The loss is assumed to be the likelihood's mean (or summed) negative
log-likelihood — cross-entropy for ``"categorical"`` (hard, soft or smoothed labels),
``½‖y − f‖²`` for ``"gaussian"`` — and its targets are read back from the output
gradient (:func:`recover_targets`), so the user passes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "LIKELIHOODS",
    "TappedPass",
    "ModelTap",
    "output_jvp",
    "low_precision",
    "output_hessian_form",
    "negative_log_likelihood",
    "recover_targets",
    "quadratic_step",
]

#: Likelihoods whose output Hessian has a closed form here.
LIKELIHOODS = ("categorical", "gaussian")


def _check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


@dataclass
class TappedPass:
    """One recorded forward/backward pass of the root model.

    Attributes:
        args, kwargs: the inputs of ``model(*args, **kwargs)`` (not copied: references).
        outputs: the model's output ``(M, C)``, detached.
        output_grad: ``∂loss/∂outputs`` ``(M, C)``, or ``None`` before ``backward``.
        batch: the size ``M`` of the batch the loss averaged over (``None``: that of
            ``outputs``; larger when the record keeps only some of its samples).
    """

    args: tuple
    kwargs: dict
    outputs: Tensor
    output_grad: Tensor | None = None
    batch: int | None = None


class ModelTap:
    """Hooks on the root model that keep the last training pass while :attr:`armed`.

    Only passes with autograd on and an output that requires grad are kept (evaluation
    under ``torch.no_grad()`` is ignored); the output must be one tensor.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.armed = False
        self.last: TappedPass | None = None
        self._handles = [
            model.register_forward_hook(self._hook, with_kwargs=True),
        ]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self.armed and torch.is_grad_enabled()):
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        record = TappedPass(tuple(args), dict(kwargs), output.detach())
        self.last = record

        def keep(grad: Tensor) -> None:
            record.output_grad = grad.detach()

        output.register_hook(keep)

    def recorded(self, samples: int | None = None) -> TappedPass | None:
        """The last complete pass (forward and backward), if any; with ``samples``,
        only its first ``samples`` samples (every tensor input whose first dimension is
        the batch's is cut; :attr:`TappedPass.batch` keeps the full batch's size)."""
        record = self.last
        if record is None or record.output_grad is None:
            return None
        batch = record.outputs.shape[0]
        if samples is None or samples >= batch:
            return record

        def cut(value: Any) -> Any:
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value[:samples]
            return value

        return TappedPass(
            tuple(cut(a) for a in record.args),
            {k: cut(v) for k, v in record.kwargs.items()},
            record.outputs[:samples],
            record.output_grad[:samples],
            batch,
        )

    def unscale(self, loss_scale: float) -> None:
        """Divide the recorded output gradient by ``loss_scale`` (a GradScaler's: the tap
        saw ``∂(s·loss)/∂outputs``), so that it is the gradient of the loss itself."""
        record = self.last
        if record is not None and record.output_grad is not None and loss_scale != 1.0:
            record.output_grad = record.output_grad / loss_scale

    def clear(self) -> None:
        """Forget the recorded pass (it holds references to the batch)."""
        self.last = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _state(model: nn.Module, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Parameters (``params`` overriding the model's own) and cloned buffers, so that a
    re-run in training mode (batch norm's running statistics) changes nothing."""
    state = {name: p.detach() for name, p in model.named_parameters()}
    if params is not None:
        state.update(params)
    state.update({name: b.clone() for name, b in model.named_buffers()})
    return state


def output_jvp(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any],
    tangents: Mapping[str, Tensor],
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(f(θ), J v)``: the model's output and its directional derivative, by forward mode.

    Args:
        tangents: ``{parameter name: v_p}`` (same shapes as the parameters); parameters
            not named have no tangent.
        params: parameter values to evaluate at (default: the model's current ones).
    """
    state = _state(model, params)
    with torch.no_grad(), fwAD.dual_level():
        for name, tangent in tangents.items():
            state[name] = fwAD.make_dual(state[name], tangent.to(state[name].dtype))
        out = functional_call(model, state, tuple(args), dict(kwargs))
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:
            tangent = torch.zeros_like(primal)
    return primal, tangent


def low_precision(t: Tensor) -> bool:
    """Whether ``t`` is float16 or bfloat16 (an autocast pass's outputs)."""
    return t.dtype in (torch.float16, torch.bfloat16)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def output_hessian_form(
    outputs: Tensor, u: Tensor, w: Tensor, likelihood: str, reduction: str = "mean"
) -> float:
    """``(1/M) Σ_i u_iᵀ H_i w_i`` (or the sum) for outputs ``(M, C)``.

    ``"categorical"``: ``H_i = diag(p_i) − p_i p_iᵀ``, ``p_i = softmax(outputs_i)``;
    ``"gaussian"``: ``H_i = I``.
    """
    _check_likelihood(likelihood)
    u, w = u.reshape(u.shape[0], -1), w.reshape(w.shape[0], -1)
    if likelihood == "gaussian":
        return _reduce((u * w).sum(1), reduction).item()
    p = torch.softmax(outputs.reshape(outputs.shape[0], -1).to(u.dtype), dim=1)
    per = (p * u * w).sum(1) - (p * u).sum(1) * (p * w).sum(1)
    return _reduce(per, reduction).item()


def negative_log_likelihood(
    outputs: Tensor, targets: Tensor, likelihood: str, reduction: str = "mean"
) -> float:
    """The loss the model is assumed to train on: cross-entropy against (soft) targets
    ``(M, C)`` or ``½‖targets − outputs‖²`` per sample, averaged (or summed)."""
    _check_likelihood(likelihood)
    outputs = outputs.reshape(outputs.shape[0], -1)
    if low_precision(outputs):
        outputs = outputs.float()
    targets = targets.reshape(targets.shape[0], -1).to(outputs.dtype)
    if likelihood == "gaussian":
        per = 0.5 * ((targets - outputs) ** 2).sum(1)
    else:
        per = -(targets * F.log_softmax(outputs, dim=1)).sum(1)
    return _reduce(per, reduction).item()


def recover_targets(
    outputs: Tensor, output_grad: Tensor, likelihood: str, reduction: str = "mean",
    batch: int | None = None,
) -> Tensor | None:
    """The targets ``y`` that make ``output_grad`` the gradient of
    :func:`negative_log_likelihood`, or ``None`` when no such targets exist (the loss is
    not that likelihood's: e.g. categorical targets that are not a distribution).

    Categorical: ``∂/∂z CE = (softmax(z) − y)/M`` gives ``y = softmax(z) − M·grad``;
    Gaussian: ``(z − y)/M`` gives ``y = z − M·grad`` (``M`` = 1 for ``"sum"``; ``batch``
    when the outputs are some of the samples of a batch of that size).
    """
    _check_likelihood(likelihood)
    z = outputs.reshape(outputs.shape[0], -1)
    if low_precision(z):  # autocast outputs: check in float32
        z = z.float()
    scale = (batch or z.shape[0]) if reduction == "mean" else 1.0
    grad = output_grad.reshape(z.shape).to(z.dtype) * scale
    if likelihood == "gaussian":
        return z - grad
    y = torch.softmax(z, dim=1) - grad
    # A low-precision output gradient (autocast) carries its dtype's rounding into y.
    tol = max(1e-3, 4 * torch.finfo(output_grad.dtype).eps)
    if not (torch.all(y > -tol) and torch.allclose(y.sum(1), torch.ones_like(y[:, 0]), atol=tol)):
        return None
    return y


def quadratic_step(
    grad_dot: tuple[float, ...], curvature: tuple[tuple[float, ...], ...]
) -> tuple[float, ...]:
    """Coefficients ``c`` minimising ``M(Σ_k c_k d_k) = Σ c_k g_k + ½ cᵀ K c`` over one or
    two directions ``d_k``: ``c = −K⁻¹ g`` with ``g_k = ∇hᵀd_k`` and
    ``K_jk = d_jᵀ(C + λI)d_k``.

    One direction: ``α* = −∇hᵀd / (dᵀCd + λ‖d‖²)`` (Martens & Grosse 2015, §7). Returns
    zeros when ``K`` is not positive definite (nothing to trust: take no step along it).
    """
    g = torch.tensor(grad_dot, dtype=torch.float64)
    K = torch.tensor(curvature, dtype=torch.float64)
    if g.numel() == 1:
        k = K.reshape(()).item()
        return (-g.item() / k,) if k > 0 else (0.0,)
    chol, info = torch.linalg.cholesky_ex(K)
    if info.item() != 0:
        return tuple(0.0 for _ in grad_dot)
    c = -torch.cholesky_solve(g.reshape(-1, 1), chol).reshape(-1)
    return tuple(c.tolist())
