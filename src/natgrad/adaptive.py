"""Step size and damping from the local quadratic model (Martens & Grosse 2015, §6.5, §7).

* :class:`QuadraticStep` — instead of KL clipping: the update is ``u = α d + μ m`` with
  ``d = −Δ`` the preconditioned direction and ``m`` the previous update, ``(α, μ)``
  minimising the quadratic model ``M`` (:mod:`natgrad.quadratic`) over that plane
  (``momentum=False``: ``μ = 0``, ``α* = −∇hᵀd / (dᵀCd + λ‖d‖²)``). ``C``'s products
  are exact (forward mode), computed every ``every`` steps; in between the last
  ``(α, μ)`` is reused. ``.grad`` receives ``−u``, so plain SGD at lr 1 applies ``u``
  exactly (a smaller lr takes that fraction of it).
* :class:`ReductionRatio` — Levenberg–Marquardt's ``ρ = (h(θ+δ) − h(θ)) / M(δ)`` for the
  update ``δ`` the optimizer actually took, on the batch it was computed from: recorded
  on one step (inputs, targets, loss, gradient, parameters), evaluated at the start of the
  next (one forward pass at the new parameters, one curvature product at the old).

Both read the model's inputs, outputs and output gradient through a
:class:`~natgrad.quadratic.ModelTap`: the training loop stays as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import PreconditionerConfig
from .damping import DampingPolicy, HeldDamping, LayerDamping, StepRecord
from .quadratic import (
    ModelTap,
    TappedPass,
    low_precision,
    negative_log_likelihood,
    output_hessian_form,
    output_jvp,
    quadratic_step,
    recover_targets,
)

__all__ = ["LevenbergMarquardt", "QuadraticStep", "ReductionRatio", "UpdateTerms", "lm_update",
           "matrix_params"]


def matrix_params(module: nn.Module, mat: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
    """Split a layer matrix ``[W, b]`` ``(d_out, d_in')`` into ``(parameter, tensor)`` pairs
    of the parameters' shapes."""
    weight = module.weight
    d_w = weight[0].numel()
    out = [(weight, mat[:, :d_w].reshape(weight.shape))]
    bias = getattr(module, "bias", None)
    if bias is not None:
        out.append((bias, mat[:, d_w]))
    return out


def _layer_matrix(module: nn.Module) -> Tensor:
    """The current ``[W, b]`` ``(d_out, d_in')`` of a layer (a copy)."""
    weight = module.weight.detach()
    mat = weight.reshape(weight.shape[0], -1)
    bias = getattr(module, "bias", None)
    if bias is not None:
        mat = torch.cat([mat, bias.detach().unsqueeze(1)], dim=1)
    return mat.clone()


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return sum(torch.dot(a[k].reshape(-1), b[k].reshape(-1)).item() for k in a if k in b)


def _weighted_sq(a: Mapping[str, Tensor], b: Mapping[str, Tensor], w: Mapping[str, float]
                 ) -> float:
    return sum(w.get(k, 0.0) * torch.dot(a[k].reshape(-1), b[k].reshape(-1)).item() for k in a)


def lm_update(damping: float, rho: float, omega: float, lower: float, upper: float) -> float:
    """Levenberg–Marquardt's rule (Martens & Grosse 2015, §6.5): ``λ ← ωλ`` when the model
    predicted well (``ρ > 3/4``), ``λ ← λ/ω`` when it did not (``ρ < 1/4``), else unchanged;
    clamped to ``[lower, upper]``. A non-finite ``ρ`` counts as a bad prediction."""
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / omega
    elif rho > 0.75:
        damping = damping * omega
    return min(max(damping, lower), upper)


@dataclass(frozen=True)
class UpdateTerms:
    """The quadratic model's terms for the update ``u`` solved on step ``step``, so that
    ``M(s·u)`` for any multiple of it costs no further pass over the model.

    Attributes:
        step: the step ``u`` was solved on.
        update: ``u`` per layer matrix ``(d_out, d_in')``.
        grad_dot: ``∇hᵀu`` (the whole batch's gradient).
        curvature: ``uᵀCu`` (on the samples the curvature products used, scaled to the
            batch's reduction).
    """

    step: int
    update: Mapping[str, Tensor]
    grad_dot: float
    curvature: float

    def model_change(self, scale: float, dampings: Mapping[str, float]) -> float:
        """``M(s·u) = s ∇hᵀu + ½ s² (uᵀCu + Σ_l λ_l ‖u_l‖²)``."""
        damped = _weighted_sq(self.update, self.update, dampings)
        return scale * self.grad_dot + 0.5 * scale * scale * (self.curvature + damped)


class _Curvature:
    """``uᵀ(C)w`` products on one tapped batch, for tangents given per layer matrix."""

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], likelihood: str,
                 reduction: str) -> None:
        self.model = model
        self.modules = modules
        self.likelihood = likelihood
        self.reduction = reduction
        self.param_names = {p: n for n, p in model.named_parameters()}

    def tangents(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, mat in mats.items():
            for param, t in matrix_params(self.modules[name], mat):
                out[self.param_names[param]] = t
        return out

    def jvps(self, record: TappedPass, directions: list[dict[str, Tensor]],
             params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        outs = []
        primal = None
        for tangents in directions:
            primal, jv = output_jvp(self.model, record.args, record.kwargs, tangents, params)
            outs.append(jv)
        return primal, outs


class QuadraticStep:
    """Martens & Grosse's step size (and momentum) from exact curvature products.

    Args:
        tap: the root model's :class:`~natgrad.quadratic.ModelTap`.
        modules: ``{layer name: module}`` of the preconditioned layers.
        likelihood: ``"categorical"`` (cross-entropy) or ``"gaussian"`` (squared error).
        reduction: the loss's ``"mean"`` or ``"sum"`` over the batch.
        momentum: solve for ``μ`` too (two directions) or not.
        every: steps between recomputations of ``(α, μ)`` (>= 1).
        max_decrease: the largest decrease the model may predict, as a fraction of the
            batch loss (which cannot fall below 0); when it predicts more, its damping
            ``λ`` is doubled until it does not (``trust_factor``: the multiplier used).
        samples: compute the curvature products on the first ``samples`` samples of the
            batch only (``None``: all); the gradient terms always use the whole batch.

    Attributes:
        alpha, mu: the coefficients in use; ``model_change``: ``M(u)`` predicted at the
            last recomputation.
    """

    def __init__(self, tap: ModelTap, modules: Mapping[str, nn.Module], likelihood: str,
                 reduction: str, momentum: bool = True, every: int = 1,
                 max_decrease: float = 0.5, samples: int | None = None) -> None:
        self.tap = tap
        self.curvature = _Curvature(tap.model, modules, likelihood, reduction)
        self.modules = modules
        self.momentum = momentum
        self.every = every
        self.max_decrease = max_decrease
        self.samples = samples
        self.alpha = 0.0
        self.mu = 0.0
        self.model_change = 0.0
        self.trust_factor = 1.0
        self.ready = False
        self.terms: UpdateTerms | None = None
        self._previous: dict[str, Tensor] | None = None
        self._solved: tuple[float, ...] | None = None

    def wants_pass(self, step: int) -> bool:
        """Whether step ``step``'s forward/backward must be tapped."""
        return step % self.every == 0 or not self.ready

    def update(self, step: int, grads: Mapping[str, Tensor], deltas: Mapping[str, Tensor],
               dampings: Mapping[str, float]) -> dict[str, Tensor] | None:
        """The update ``u`` per layer matrix ``(d_out, d_in')``, or ``None`` when none can
        be computed (no tapped pass, or a loss that is not the likelihood's, before any
        step was). ``grads``: ``∇W̄``; ``deltas``: ``Δ``; ``dampings``: ``λ_l``."""
        current = {name: _layer_matrix(m) for name, m in self.modules.items()}
        previous = None
        if self.momentum and self._previous is not None:
            previous = {n: current[n] - self._previous[n] for n in current}
            if _dot(previous, previous) == 0.0:
                previous = None
        self._previous = current
        d = {n: -delta for n, delta in deltas.items()}
        self._solved = None
        if step % self.every == 0 or not self.ready:
            record = self.tap.recorded(self.samples)
            if record is not None:
                self._solve(record, grads, d, previous, dampings)
        if not self.ready:
            return None
        if previous is None:
            update = {n: self.alpha * d[n] for n in d}
        else:
            update = {n: self.alpha * d[n] + self.mu * previous[n] for n in d}
        self.terms = None
        if self._solved is not None:
            self.terms = UpdateTerms(step, update, *self._solved)
        return update

    def _solve(self, record: TappedPass, grads, d, previous, dampings) -> None:
        cur = self.curvature
        targets = recover_targets(record.outputs, record.output_grad, cur.likelihood,
                                  cur.reduction, record.batch)
        if targets is None:
            return
        directions = [d] if previous is None else [d, previous]
        z, jvs = cur.jvps(record, [cur.tangents(v) for v in directions])
        n = len(directions)
        # Under a summed loss, forms over some of the batch's samples scale up to all.
        part = 1.0
        if cur.reduction == "sum" and record.batch is not None:
            part = record.batch / z.shape[0]
        curv = [[0.0] * n for _ in range(n)]
        damp = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i, n):
                form = output_hessian_form(z, jvs[i], jvs[j], cur.likelihood, cur.reduction)
                curv[i][j] = curv[j][i] = part * form
                damp[i][j] = damp[j][i] = _weighted_sq(directions[i], directions[j], dampings)
        g = tuple(_dot(grads, v) for v in directions)
        # The loss is >= 0: a model that predicts a decrease of more than `max_decrease`
        # of it is trusted less, its damping doubled until it does not.
        loss = part * negative_log_likelihood(z, targets, cur.likelihood, cur.reduction)
        factor = 1.0
        for _ in range(60):
            K = tuple(tuple(curv[i][j] + factor * damp[i][j] for j in range(n)) for i in range(n))
            coeffs = quadratic_step(g, K)
            change = 0.5 * sum(c * gk for c, gk in zip(coeffs, g))
            if -change <= self.max_decrease * loss:
                break
            factor *= 2.0
        if not all(math.isfinite(c) for c in coeffs):
            return
        self.trust_factor = factor
        self.alpha = coeffs[0]
        self.mu = coeffs[1] if n == 2 else 0.0
        self.model_change = change
        self.ready = True
        grad_dot = sum(c * gk for c, gk in zip(coeffs, g))
        quad = sum(coeffs[i] * curv[i][j] * coeffs[j] for i in range(n) for j in range(n))
        self._solved = (grad_dot, quad)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "mu": self.mu, "ready": self.ready,
                "model_change": self.model_change, "trust_factor": self.trust_factor,
                "previous": None if self._previous is None else dict(self._previous)}

    def load_state_dict(self, state: Mapping) -> None:
        self.alpha, self.mu, self.ready = state["alpha"], state["mu"], state["ready"]
        self.model_change, self.trust_factor = state["model_change"], state["trust_factor"]
        prev = state["previous"]
        self._previous = None if prev is None else {k: v.clone() for k, v in prev.items()}


class ReductionRatio:
    """``ρ`` of the update taken after a recorded step (see the module docstring).

    Args:
        tap: the root model's :class:`~natgrad.quadratic.ModelTap`.
        modules: ``{layer name: module}`` of the preconditioned layers (their parameters
            get the ``λ_l‖δ‖²`` term; other parameters none).
        likelihood, reduction: as for :class:`QuadraticStep`.
        rule: the :class:`QuadraticStep` sizing the updates, if any. When the update taken
            is a multiple ``s·u`` of the one it solved for on the recorded step (plain SGD
            applies ``lr·u``) and no other parameter moved, ``M(s·u)`` comes from its
            :class:`UpdateTerms` and ``ρ`` costs one forward pass; otherwise ``M(δ)`` is
            computed exactly (one more forward-mode pass over the recorded batch).

    Attributes:
        last: the last ``ρ``; ``exact``: whether it used the forward-mode ``M(δ)``.
    """

    def __init__(self, tap: ModelTap, modules: Mapping[str, nn.Module], likelihood: str,
                 reduction: str, rule: QuadraticStep | None = None) -> None:
        self.tap = tap
        self.rule = rule
        self.exact = False
        self.model = tap.model
        self.modules = modules
        self.likelihood = likelihood
        self.reduction = reduction
        self.last: float | None = None
        self._pending: dict | None = None
        names = {p: n for n, p in self.model.named_parameters()}
        self._layer_params = {
            layer: [names[p] for p in m.parameters() if p in names] for layer, m in modules.items()
        }

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def record(self, layer_grads: Mapping[str, Tensor], step: int | None = None) -> bool:
        """Keep this step's batch, targets, loss, gradient and parameters (and the rule's
        :class:`UpdateTerms` when it solved on step ``step``). ``layer_grads``:
        ``∇W̄`` of the preconditioned layers before preconditioning; other parameters'
        gradients are read from ``.grad``. ``False`` when there is no tapped pass or the
        loss is not the likelihood's."""
        record = self.tap.recorded()
        if record is None:
            return False
        targets = recover_targets(record.outputs, record.output_grad, self.likelihood,
                                  self.reduction, record.batch)
        if targets is None:
            return False
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                 if p.grad is not None}
        param_names = {p: n for n, p in self.model.named_parameters()}
        for layer, mat in layer_grads.items():
            for param, tensor in matrix_params(self.modules[layer], mat):
                grads[param_names[param]] = tensor.detach().clone()
        outputs = record.outputs
        if low_precision(outputs):
            # An autocast pass: the loss after the step is evaluated in the model's own
            # dtype, so the loss before it must be too (else ρ measures rounding).
            outputs, _ = output_jvp(self.model, record.args, record.kwargs, {})
        self._pending = {
            "args": record.args,
            "kwargs": record.kwargs,
            "targets": targets,
            "loss": negative_log_likelihood(outputs, targets, self.likelihood,
                                            self.reduction),
            "grads": grads,
            "params": {n: p.detach().clone() for n, p in self.model.named_parameters()},
        }
        terms = None if self.rule is None else self.rule.terms
        if terms is not None and step is not None and terms.step == step:
            self._pending["terms"] = {"step": step, "update": dict(terms.update),
                                      "grad_dot": terms.grad_dot,
                                      "curvature": terms.curvature}
        return True

    def ratio(self, dampings: Mapping[str, float]) -> float | None:
        """``ρ`` for the recorded step at the parameters the optimizer has moved to since;
        ``None`` when nothing is pending; ``−∞`` when the model predicted no decrease and
        the loss rose; ``None`` when it predicted none and the loss fell.
        ``dampings``: ``λ_l`` per preconditioned layer."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        now = {n: p.detach() for n, p in self.model.named_parameters()}
        delta = {n: now[n] - pending["params"][n] for n in now}
        args, kwargs = pending["args"], pending["kwargs"]
        new_out, _ = output_jvp(self.model, args, kwargs, {})
        actual = negative_log_likelihood(new_out, pending["targets"], self.likelihood,
                                         self.reduction) - pending["loss"]
        terms = pending.get("terms")
        terms = None if terms is None else UpdateTerms(**terms)
        scale = self._multiple(terms, delta)
        self.exact = scale is None
        if scale is not None:
            predicted = terms.model_change(scale, dampings)
        else:
            predicted = self._exact_change(pending, delta, dampings)
        if predicted < 0:
            self.last = actual / predicted
        else:
            # The model itself says this update does not decrease the loss (a step far
            # past its minimum): when the loss did rise, that is the worst agreement.
            self.last = -math.inf if actual >= 0 else None
        return self.last

    def _multiple(self, terms: UpdateTerms | None, delta: Mapping[str, Tensor]
                  ) -> float | None:
        """``s`` when ``delta`` is ``s·u`` (to the parameters' rounding) for the solved
        update ``u`` and moves nothing else; else ``None``."""
        if terms is None:
            return None
        names = {p: n for n, p in self.model.named_parameters()}
        u = {names[p]: t for layer, mat in terms.update.items()
             for p, t in matrix_params(self.modules[layer], mat)}
        if any(n not in u and bool(torch.any(d != 0)) for n, d in delta.items()):
            return None
        uu = _dot(u, u)
        if uu == 0.0:
            return None
        scale = _dot(delta, u) / uu
        residual = sum(torch.sum((delta[n] - scale * t) ** 2).item() for n, t in u.items())
        tol = math.sqrt(torch.finfo(next(iter(u.values())).dtype).eps)
        return scale if residual <= tol * tol * _dot(delta, delta) else None

    def _exact_change(self, pending: dict, delta: Mapping[str, Tensor],
                      dampings: Mapping[str, float]) -> float:
        """``M(δ)`` by a forward-mode pass over the recorded batch at the old parameters."""
        old_out, jv = output_jvp(self.model, pending["args"], pending["kwargs"], delta,
                                 pending["params"])
        quad = output_hessian_form(old_out, jv, jv, self.likelihood, self.reduction)
        weights = {p: dampings[layer] for layer, ps in self._layer_params.items() for p in ps}
        return _dot(pending["grads"], delta) + 0.5 * (quad + _weighted_sq(delta, delta, weights))

    def state_dict(self) -> dict | None:
        """The pending record (its inputs must be tensors to be saved; otherwise it is
        dropped and a resumed run skips one ratio)."""
        p = self._pending
        if p is None or not all(isinstance(a, Tensor) for a in (*p["args"], *p["kwargs"].values())):
            return None
        return dict(p)

    def load_state_dict(self, state: dict | None) -> None:
        self._pending = None if state is None else dict(state)


class LevenbergMarquardt(HeldDamping):
    """Levenberg–Marquardt damping over any base policy: ``λ_l = c · base_l`` with
    ``c = λ / config.damping``, where ``λ`` (starting at ``config.damping``) follows
    :func:`lm_update` of the reduction ratio ``ρ`` measured every ``config.T_lm`` steps.

    Where an inverse fixes its damping at each refresh (K-FAC's factored inverse, TKFAC,
    SKFAC's first inverses...), a new ``λ`` reaches the inverses at the next refresh;
    eigen forms (EKFAC, TEKFAC, K-FAC ``inverse="eigen"``) use it at the next step.
    """

    state_key = "lm_damping"

    def __init__(self, base: DampingPolicy, ratio: ReductionRatio) -> None:
        self.base = base
        self.ratio = ratio
        self.damping: float | None = None
        self._in_force: LayerDamping | None = None
        self._config: PreconditionerConfig | None = None

    def _lambda(self, config: PreconditionerConfig) -> float:
        if self.damping is None:
            self.damping = config.damping
        return self.damping

    def resolve(self, config, blocks, refresh) -> LayerDamping:
        self._config = config
        baked = any(block.inverse.damping_in_refresh for block in blocks.values())
        if self._in_force is None or not baked or refresh:
            dampings, scales = self.base.resolve(config, blocks, refresh)
            factor = self._lambda(config) / config.damping
            self._in_force = ({n: v * factor for n, v in dampings.items()}, scales)
        return dict(self._in_force[0]), dict(self._in_force[1])

    def configure(self, old, new) -> bool:
        if new.damping != old.damping:
            self.damping = new.damping
        changed = self.base.configure(old, new)
        if changed or new.damping != old.damping:
            self._in_force = None
        return changed

    def observe_step(self, record: StepRecord) -> None:
        """At the end of a step (the optimizer has not moved yet, so the parameters are
        those the last recorded step's update led to): ``ρ`` of that update moves ``λ``;
        then, on steps ``t % T_lm == 0``, this step is recorded.

        A step the quadratic step had to shorten with its trust factor (its model, at the
        damping in force, predicted a decrease larger than the loss allows) counts as one
        step of poor agreement: ``λ ← λ/lm_omega`` (LM's per-step rate). Otherwise ``ρ``,
        measured along such short steps, finds the model good and lowers ``λ`` while the
        direction ``Δ`` is built with ever less damping (EKFAC's ran down to 1e-5 under a
        cap of 512–4096, and its test accuracy fell from 87 % to 79 %); with it, ``λ``
        holds where the cap binds about as often as ``ρ`` is good.
        """
        self.base.observe_step(record)
        config = self._config
        lower, upper = config.damping_bounds
        if self.ratio.pending:
            rho = self.ratio.ratio(record.damping[0])
            if rho is not None:
                omega = config.lm_omega ** config.T_lm
                self.damping = lm_update(self._lambda(config), rho, omega, lower, upper)
        if self._trust_factor(record.step) > 1.0:
            self.damping = min(max(self._lambda(config) / config.lm_omega, lower), upper)
        if record.step % config.T_lm == 0:
            self.ratio.record(record.grads, record.step)

    def _trust_factor(self, step: int) -> float:
        """The quadratic step's trust factor if it solved on step ``step``, else 1."""
        rule = self.ratio.rule
        if rule is None or rule.terms is None or rule.terms.step != step:
            return 1.0
        return rule.trust_factor

    def state_dict(self) -> dict:
        return {
            "damping": self.damping,
            "in_force": None if self._in_force is None else (dict(self._in_force[0]),
                                                             dict(self._in_force[1])),
            "pending": self.ratio.state_dict(),
            "base": self.base.state_dict(),
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        self.damping = state["damping"]
        cached = state["in_force"]
        self._in_force = None if cached is None else (dict(cached[0]), dict(cached[1]))
        self.ratio.load_state_dict(state["pending"])
        self.base.load_state_dict(state["base"])


class QuadraticModel:
    """The quadratic-model features of one preconditioner, behind one object: the tap on
    the root model, the step rule (``config.step_size == "quadratic"``) and the reduction
    ratio (``config.lm_damping``), each built when the config asks for it.

    Args:
        model: the root model.
        blocks: ``{layer name: LayerBlock}`` of the preconditioned layers.
        reduction: the loss's ``"mean"`` or ``"sum"``.
        config: the preconditioner's config (see :meth:`sync`).
    """

    def __init__(self, model: nn.Module, blocks: Mapping[str, Any], reduction: str,
                 config: PreconditionerConfig) -> None:
        self.tap = ModelTap(model)
        self.modules = {name: block.module for name, block in blocks.items()}
        self.reduction = reduction
        self.rule: QuadraticStep | None = None
        self.ratio: ReductionRatio | None = None
        self.sync(config)

    def sync(self, config: PreconditionerConfig) -> None:
        """Build, update or drop the parts ``config`` asks for."""
        if config.step_size != "quadratic":
            self.rule = None
        elif self.rule is None or self.rule.curvature.likelihood != config.likelihood:
            self.rule = QuadraticStep(self.tap, self.modules, config.likelihood, self.reduction)
        if self.rule is not None:
            self.rule.momentum = config.step_momentum
            self.rule.every = config.T_step
            self.rule.samples = config.curvature_samples
        if not config.lm_damping:
            self.ratio = None
        elif self.ratio is None or self.ratio.likelihood != config.likelihood:
            self.ratio = ReductionRatio(self.tap, self.modules, config.likelihood,
                                        self.reduction)
        if self.ratio is not None:
            self.ratio.rule = self.rule

    def arm(self, config: PreconditionerConfig, step: int) -> None:
        """Forget the last pass; tap the coming one if step ``step`` needs it."""
        self.tap.clear()
        wants = self.rule is not None and self.rule.wants_pass(step)
        self.tap.armed = wants or (config.lm_damping and step % config.T_lm == 0)

    def check_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The quadratic step sets the whole update (momentum included): it needs plain
        SGD.

        Raises:
            ValueError: another optimizer, or SGD with momentum, Nesterov or weight decay.
        """
        if self.rule is None or optimizer is None:
            return
        plain = isinstance(optimizer, torch.optim.SGD) and all(
            g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0
            for g in optimizer.param_groups
        )
        if not plain:
            groups = [{k: g.get(k) for k in ("momentum", "weight_decay")}
                      for g in optimizer.param_groups]
            raise ValueError(
                "step_size='quadratic' computes the whole update (its own momentum "
                "included): pair it with torch.optim.SGD(params, lr=1.0) without momentum "
                f"or weight decay, got {type(optimizer).__name__} with "
                f"{groups}"
            )

    def update(self, step: int, grads: Mapping[str, Tensor], deltas: Mapping[str, Tensor],
               dampings: Mapping[str, float]) -> dict[str, Tensor] | None:
        """What to write into ``.grad`` (``−u``: SGD at lr 1 then applies ``u``), or
        ``None`` when the model could not be evaluated."""
        update = self.rule.update(step, grads, deltas, dampings)
        return None if update is None else {n: -u for n, u in update.items()}

    def remove(self) -> None:
        self.tap.remove()

    def state_dict(self) -> dict | None:
        return None if self.rule is None else self.rule.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.rule is not None and state is not None:
            self.rule.load_state_dict(state)
