"""The preconditioner: capture × curvature estimate × inverse strategy, before any optimizer.

A :class:`Preconditioner` rewrites the ``.grad`` of every handled layer into the
natural-gradient direction ``Δ``; the user's own ``torch.optim`` optimizer then steps
(momentum, weight decay and learning-rate schedules are the optimizer's)::

    pre = natgrad.KFAC(model, optimizer)
    loss.backward()
    pre.step()        # .grad ← Δ (KL-clipped)
    optimizer.step()

A method is a subclass that names its config class and builds, per layer, one
:class:`~natgrad.curvature.Curvature` and one :class:`~natgrad.inverses.InverseStrategy`.
Schedules, damping, KL clipping, fault handling and ``state_dict`` live here, once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import LayerCapture, LayerStats
from .config import PreconditionerConfig
from .curvature import Curvature, NonFiniteStatistics
from .inverses import InverseStrategy
from .layers import LayerHandler, grad_matrix, handler_for, write_grad_matrix
from .linalg import DecompositionError, all_finite, kl_clip_scale
from .sharing import Local

if TYPE_CHECKING:
    from .distributed import DataParallel

__all__ = ["Preconditioner", "ClippingWarning", "NumericalWarning", "UnsupportedLayerWarning"]

STATE_VERSION = 1
#: Damping multipliers tried, in order, when an inverse update fails.
_RETRY_DAMPING = (10.0, 100.0)


class NumericalWarning(RuntimeWarning):
    """A numerical fault was met and handled (the step fell back; training goes on)."""


class ClippingWarning(UserWarning):
    """KL clipping has bounded every recent step, so the learning rate no longer sets the
    step size (``η·ν·Δ`` with ``ν ∝ 1/η``)."""


#: Consecutive clipped steps after which :class:`ClippingWarning` is issued (once).
CLIP_STREAK_WARNING = 200


class UnsupportedLayerWarning(UserWarning):
    """A Linear/Conv2d configuration natgrad cannot precondition; it is left untouched."""


@dataclasses.dataclass
class _Layer:
    """One handled layer: its module, handler, curvature and inverse."""

    module: nn.Module
    handler: LayerHandler
    curvature: Curvature
    inverse: InverseStrategy


class Preconditioner(ABC):
    """Base class of every natgrad method.

    Args:
        model: the network. Every ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) not
            excluded is preconditioned; other parameters are left to the optimizer.
        optimizer: the ``torch.optim`` optimizer that steps after :meth:`step`; needed
            for KL clipping (it reads each parameter group's ``lr``). Can be attached
            later with :meth:`attach`.
        exclude: module qualified names (``fnmatch`` patterns, e.g. ``"head.*"``) or
            module types to leave to the optimizer unpreconditioned.
        fisher: ``"empirical"`` (output gradients of the training loss; free) or
            ``"mc"`` (Monte-Carlo "true" Fisher: call :meth:`sample_fisher` on the
            model's outputs before ``loss.backward()``).
        loss_reduction: ``"mean"`` (the loss is a batch mean; default) or ``"sum"``.
        seed: seed of the generator that samples labels for ``fisher="mc"``.
        distributed: a :class:`natgrad.distributed.DataParallel` to share statistics and
            inverse work across data-parallel workers (docs/distributed.md); ``None``:
            this process alone.
        **hyperparameters: fields of the method's config (see ``config_class``).
    """

    config_class: ClassVar[type[PreconditionerConfig]] = PreconditionerConfig

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        exclude: Iterable[str | type[nn.Module]] = (),
        fisher: str = "empirical",
        loss_reduction: str = "mean",
        seed: int = 0,
        distributed: DataParallel | None = None,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.config = self.config_class(**hyperparameters)
        self.fisher = fisher
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        #: The KL-clipping factor ``ν`` of the last step (1.0 when clipping is off/inactive).
        self.kl_scale = 1.0
        self._clip_streak = 0
        self._stale = False
        self._warned: set[tuple[str, str]] = set()
        self._generator = torch.Generator().manual_seed(seed)

        self.skipped: dict[str, str] = {}
        self.layers: dict[str, _Layer] = {}
        exclude = _check_exclude(exclude)
        for name, module in model.named_modules():
            handler = handler_for(module)
            if handler is None or _excluded(name, module, exclude):
                continue
            reason = handler.unsupported_reason(module)
            if reason is not None:
                self.skipped[name] = reason
                continue
            self.layers[name] = self._make_layer(name, module, handler)
        if self.skipped:
            listed = "; ".join(f"{n or '<root>'}: {r}" for n, r in self.skipped.items())
            warnings.warn(
                f"{type(self).__name__} leaves these layers to the optimizer unpreconditioned: "
                f"{listed}",
                UnsupportedLayerWarning,
                stacklevel=2,
            )
        if not self.layers:
            raise ValueError(
                f"model has no layer {type(self).__name__} can precondition: it needs at "
                "least one nn.Linear or nn.Conv2d (groups=1) that is not excluded"
            )
        self._capture = LayerCapture(
            {n: (layer.module, layer.handler) for n, layer in self.layers.items()},
            loss_reduction,
        )
        self._capture.record_grads = fisher == "empirical"
        if optimizer is not None:
            self.attach(optimizer)
        self.distributed = distributed
        # Where one process and data-parallel workers differ (sharing.py); no other
        # code branches on it.
        self._sharing = Local() if distributed is None else distributed
        self._sharing.bind(self)

    # ------------------------------------------------------------------ method hooks
    @abstractmethod
    def make_curvature(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> Curvature:
        """The curvature estimate of one layer with gradient matrix of ``shape``."""

    @abstractmethod
    def make_inverse(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> InverseStrategy:
        """The inverse strategy of one layer with gradient matrix of ``shape``."""

    def layer_dampings(self) -> dict[str, float]:
        """Damping ``λ_l`` per layer for the coming refresh/apply (default: ``config.damping``).

        Methods with adaptive damping override it (TKFAC/TEKFAC through
        :class:`~natgrad.damping.TraceAdaptiveDamping`).
        """
        return {name: self.config.damping for name in self.layers}

    def observe_decay(self) -> float:
        """Running-average decay of what an inverse strategy fits in its own basis
        (:meth:`InverseStrategy.observe`; default: the curvature's ``config.decay``).

        Methods with a separate decay for it override it (EKFAC/TEKFAC's ``rescale_decay``,
        ``004_…``'s ``β₁``, through :class:`~natgrad.methods.ekfac.RescalingSchedule`).
        """
        return self.config.decay

    # ------------------------------------------------------------------ set-up
    def _make_layer(self, name: str, module: nn.Module, handler: LayerHandler) -> _Layer:
        shape = handler.shape(module)
        weight = module.weight
        # Factors and decompositions in float32 or wider, whatever the model's dtype.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return _Layer(
            module,
            handler,
            self.make_curvature(shape, dtype, weight.device),
            self.make_inverse(shape, dtype, weight.device),
        )

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Attach the optimizer whose learning rates KL clipping reads."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer

    def configure(self, **changes: Any) -> None:
        """Change hyperparameters between steps, validated like the constructor's.

        A new ``damping`` (or ``T_inv``) takes effect at the next :meth:`step`, which then
        recomputes every inverse; ``T_cov``, ``decay`` and ``kl_clip`` apply from the next
        step on. Schedules count from step 0, so a new ``T_cov``/``T_inv`` keeps the
        phase ``steps % T``.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self.config)}
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(self.config))
            raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; allowed: {allowed}")
        new = dataclasses.replace(self.config, **changes)
        if new.damping != self.config.damping or new.T_inv != self.config.T_inv:
            self._stale = True
        self.config = new
        self._capture.active = self._capture.active or self._wants_stats(self.steps)

    # ------------------------------------------------------------------ schedules
    def _updates_curvature(self, step: int) -> bool:
        return step % self.config.T_cov == 0

    def _refreshes(self, step: int) -> bool:
        return step % self.config.T_inv == 0 or self._stale

    def _observes(self, step: int, layer: _Layer) -> bool:
        every = layer.inverse.observe_every
        return every is not None and (step % every == 0 or self._refreshes(step))

    def _wants_stats(self, step: int) -> bool:
        return self._updates_curvature(step) or any(
            self._observes(step, layer) for layer in self.layers.values()
        )

    # ------------------------------------------------------------------ Monte-Carlo Fisher
    def sample_fisher(self, outputs: Tensor, likelihood: str = "categorical") -> None:
        """Record output gradients for the Monte-Carlo ("true") Fisher.

        Call it after the forward pass and before ``loss.backward()`` with the model's
        outputs; it samples targets from the model's predictive distribution
        (``"categorical"``: logits of shape ``(M, C)``; ``"gaussian"``: unit-variance
        means), backpropagates their loss to the layer outputs only (``.grad`` is not
        touched) and keeps the graph for your own backward. A no-op on steps where no
        statistics are recorded, and when ``fisher="empirical"``.
        """
        if self.fisher != "mc" or not self._capture.active:
            return
        if likelihood not in ("categorical", "gaussian"):
            raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
        with torch.no_grad():
            if likelihood == "categorical":
                probs = F.softmax(outputs.detach().float().cpu(), dim=-1)
                target = torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)
                target = target.to(outputs.device)
            else:
                noise = torch.randn(outputs.shape, generator=self._generator, dtype=outputs.dtype)
                target = outputs.detach() + noise.to(outputs.device)
        if likelihood == "categorical":
            loss = F.cross_entropy(outputs, target, reduction=self._capture.loss_reduction)
        else:
            loss = 0.5 * F.mse_loss(outputs, target, reduction="sum")
            if self._capture.loss_reduction == "mean":
                loss = loss / outputs.shape[0]
        watched = [p for layer in self.layers.values() for p in layer.module.parameters()]
        self._capture.record_grads = True
        try:
            torch.autograd.grad(loss, watched, retain_graph=True, allow_unused=True)
        finally:
            self._capture.record_grads = False

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """Update curvature/inverses on schedule and rewrite ``.grad`` into ``Δ``.

        Raises:
            RuntimeError: no handled parameter has a gradient (call ``loss.backward()``
                first), or KL clipping is on and no optimizer is attached.
        """
        grads = self.grad_matrices()
        if not grads:
            raise RuntimeError(
                "step() found no gradient on any preconditioned layer: call loss.backward() "
                "before step()"
            )
        if self.config.kl_clip is not None and self.optimizer is None:
            raise RuntimeError(
                "KL clipping (kl_clip set) needs the learning rate: pass optimizer= to the "
                "constructor or call attach(optimizer), or set kl_clip=None"
            )
        step = self.steps
        refresh = self._refreshes(step)
        stats = self._capture.pop() if self._capture.active else {}
        if self._updates_curvature(step):
            self._update_curvature(stats)
        dampings = self.layer_dampings()
        if refresh:
            self._refresh_all(dampings)
        for name, layer in self.layers.items():
            if name in stats and self._observes(step, layer) and layer.inverse.ready:
                observe = self._sharing.observation(layer.inverse)
                self._guard(name, "observe", observe, stats[name], self.observe_decay())
        deltas = self._precondition(grads, dampings)
        self._write(deltas)
        self._stale = False
        self.steps += 1
        self._capture.active = self._wants_stats(self.steps)

    def _update_curvature(self, stats: Mapping[str, LayerStats]) -> None:
        for name, layer in self.layers.items():
            if name not in stats:
                continue
            decay = self.config.decay if layer.curvature.initialized else 0.0
            update = self._sharing.curvature_update(layer.curvature)
            self._guard(name, "statistics", update, stats[name], decay)

    def _refresh_all(self, dampings: Mapping[str, float]) -> None:
        self._sharing.refresh(self, dampings)

    def _guard(self, name: str, what: str, fn, *args) -> bool:
        """Run ``fn``; on NaN/Inf statistics warn once and leave the state as it was."""
        try:
            fn(*args)
            return True
        except NonFiniteStatistics:
            self._warn_once(
                name,
                what,
                f"layer {name!r}: non-finite {what} in this batch; kept the "
                "previous running estimate",
            )
            return False

    def _refresh(self, name: str, layer: _Layer, damping: float) -> None:
        if not layer.curvature.initialized:
            return
        factors = (1.0, *_RETRY_DAMPING) if layer.inverse.damping_in_refresh else (1.0,)
        for factor in factors:
            try:
                layer.inverse.refresh(layer.curvature, damping * factor)
            except DecompositionError as err:
                last = err
                continue
            if factor != 1.0:
                self._warn_once(
                    name,
                    "retry",
                    f"layer {name!r}: inverse update failed at damping "
                    f"{damping:g}; succeeded with {damping * factor:g}",
                )
            return
        fallback = "the previous inverse" if layer.inverse.ready else "the plain gradient"
        tried = f" even with damping {damping * factors[-1]:g}" if len(factors) > 1 else ""
        self._warn_once(
            name,
            "refresh",
            f"layer {name!r}: inverse update failed{tried} ({last}); using {fallback}",
        )

    def _warn_once(self, name: str, kind: str, message: str) -> None:
        if (name, kind) not in self._warned:
            self._warned.add((name, kind))
            warnings.warn(message, NumericalWarning, stacklevel=3)

    # ------------------------------------------------------------------ preconditioning
    def grad_matrices(self) -> dict[str, Tensor]:
        """``∇W̄`` (``(d_out, d_in')``) of every handled layer that has a gradient."""
        out = {}
        for name, layer in self.layers.items():
            mat = grad_matrix(layer.module)
            if mat is not None:
                out[name] = mat
        return out

    def precondition(
        self, grads: Mapping[str, Tensor], dampings: Mapping[str, float] | None = None
    ) -> dict[str, Tensor]:
        """``Δ_l`` for given gradient matrices ``{layer name: (d_out, d_in')}``.

        Uses the current inverses; touches neither ``.grad`` nor any state, and applies no
        KL clipping. Layers whose inverse is not ready (or whose result is not finite)
        get their gradient back unchanged.
        """
        dampings = self.layer_dampings() if dampings is None else dampings
        out = {}
        for name, grad in grads.items():
            if name not in self.layers:
                raise KeyError(f"{name!r} is not a preconditioned layer; see .layers")
            layer = self.layers[name]
            if not layer.inverse.ready:
                out[name] = grad
                continue
            delta = layer.inverse.apply(grad.to(layer.inverse.dtype), dampings[name])
            if not all_finite(delta):
                if torch.isfinite(grad).all():
                    self._warn_once(
                        name,
                        "apply",
                        f"layer {name!r}: preconditioned gradient is not "
                        "finite; used the plain gradient",
                    )
                delta = grad
            out[name] = delta.to(grad.dtype)
        return out

    def _precondition(
        self, grads: Mapping[str, Tensor], dampings: Mapping[str, float]
    ) -> dict[str, Tensor]:
        deltas = self._sharing.precondition(self, grads, dampings)
        if self.config.kl_clip is not None:
            lrs = self._learning_rates()
            vdotg = sum(
                lrs[name] ** 2 * torch.dot(deltas[name].reshape(-1), grads[name].reshape(-1)).item()
                for name in deltas
            )
            nu = kl_clip_scale(self.config.kl_clip, 1.0, vdotg)
            self._note_clip(nu)
            if nu != 1.0:
                deltas = {name: d * nu for name, d in deltas.items()}
        return deltas

    def _note_clip(self, nu: float) -> None:
        self.kl_scale = nu
        self._clip_streak = self._clip_streak + 1 if nu < 1.0 else 0
        if self._clip_streak == CLIP_STREAK_WARNING and ("*", "clip") not in self._warned:
            self._warned.add(("*", "clip"))
            warnings.warn(
                f"KL clipping (kl_clip={self.config.kl_clip:g}) has scaled down each of the "
                f"last {CLIP_STREAK_WARNING} steps (last factor {nu:.3g}): the step size no "
                "longer depends on the learning rate. Raise kl_clip or damping, or lower the "
                "learning rate, if that is not intended.",
                ClippingWarning,
                stacklevel=4,
            )

    def _learning_rates(self) -> dict[str, float]:
        lr_of = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                lr_of[p] = group["lr"]
        return {
            name: float(lr_of.get(layer.module.weight, 0.0)) for name, layer in self.layers.items()
        }

    def _write(self, deltas: Mapping[str, Tensor]) -> None:
        for name, delta in deltas.items():
            write_grad_matrix(self.layers[name].module, delta)

    # ------------------------------------------------------------------ introspection
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Current running factors ``(A, G)`` of every layer that has seen a batch,
        by qualified name, as dense tensors in MATH.md's convention."""
        return {
            name: layer.curvature.factors()
            for name, layer in self.layers.items()
            if layer.curvature.initialized
        }

    def remove(self) -> None:
        """Remove every hook from the model (the preconditioner is unusable after)."""
        self._capture.remove()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for field in dataclasses.fields(self.config):
            lines.append(f"  {field.name}={getattr(self.config, field.name)!r},")
        lines.append(f"  fisher={self.fisher!r},")
        lines.append("  preconditioned=[")
        for name, layer in self.layers.items():
            d_out, d_in = layer.handler.shape(layer.module)
            lines.append(f"    {name}: {type(layer.module).__name__} ∇W̄ {d_out}×{d_in},")
        lines.append("  ],")
        if self.skipped:
            lines.append("  skipped=[")
            lines.extend(f"    {n}: {r}," for n, r in self.skipped.items())
            lines.append("  ],")
        lines.append(")")
        return "\n".join(lines)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: step, config, per-layer state."""
        return {
            "version": STATE_VERSION,
            "method": type(self).__name__,
            "steps": self.steps,
            "stale": self._stale,
            "config": self.config.as_dict(),
            "generator": self._generator.get_state(),
            "layers": {
                name: {
                    "curvature": layer.curvature.state_dict(),
                    "inverse": layer.inverse.state_dict(),
                }
                for name, layer in self.layers.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; layer names must match this model's."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"unsupported state version {version!r}; expected {STATE_VERSION}")
        if state.get("method") != type(self).__name__:
            raise ValueError(
                f"state was saved by {state.get('method')!r}, not {type(self).__name__!r}"
            )
        saved, ours = set(state["layers"]), set(self.layers)
        if saved != ours:
            raise ValueError(
                f"saved layers do not match this model's: missing {sorted(ours - saved)}, "
                f"unexpected {sorted(saved - ours)}"
            )
        self.config = self.config_class(**state["config"])
        for name, layer in self.layers.items():
            layer.curvature.load_state_dict(state["layers"][name]["curvature"])
            layer.inverse.load_state_dict(state["layers"][name]["inverse"])
        self.steps = int(state["steps"])
        self._stale = bool(state["stale"])
        self._generator.set_state(state["generator"])
        self._capture.clear()
        self._capture.active = self._wants_stats(self.steps)


def _check_exclude(exclude: Iterable[str | type[nn.Module]]) -> tuple:
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    exclude = tuple(exclude)
    for item in exclude:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(
                "exclude entries must be module names/patterns (str) or nn.Module types, "
                f"got {item!r}"
            )
    return exclude


def _excluded(name: str, module: nn.Module, exclude: tuple) -> bool:
    return any(
        fnmatch.fnmatchcase(name, item) if isinstance(item, str) else isinstance(module, item)
        for item in exclude
    )
