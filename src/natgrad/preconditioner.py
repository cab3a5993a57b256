"""The preconditioner: capture × curvature estimate × inverse strategy, before any optimizer.

A :class:`Preconditioner` rewrites the ``.grad`` of every handled layer into the
natural-gradient direction ``Δ``; the user's own ``torch.optim`` optimizer then steps
(momentum, weight decay and learning-rate schedules are the optimizer's)::

    pre = natgrad.KFAC(model, optimizer)
    loss.backward()
    pre.step()        # .grad ← Δ (KL-clipped)
    optimizer.step()

A method is a subclass that names its config class and builds, per layer, one
:class:`~natgrad.curvature.Curvature` and one :class:`~natgrad.inverses.InverseStrategy`
(and, optionally, its :class:`~natgrad.damping.DampingPolicy`). This class ties the parts
together: layer selection (selection.py), the per-layer blocks with their guards
(block.py), the phases of one step (step.py), schedules (schedule.py), damping
(damping.py), KL clipping (clipping.py), the Monte-Carlo Fisher (mc_fisher.py), sharing
between processes (sharing.py) and saving / restoring state (resume.py).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .adaptive import LevenbergMarquardt, QuadraticModel
from .batching import resolve_batch_dims
from .block import LayerBlock
from .capture import LayerCapture
from .clipping import KLClipping
from .config import PreconditionerConfig
from .curvature import Curvature
from .damping import ConstantDamping, DampingPolicy, LayerDamping
from .errors import (  # noqa: F401 - re-exported: natgrad.preconditioner.*Warning
    ClippingWarning,
    NumericalWarning,
    UnsupportedLayerWarning,
    WarnOnce,
)
from .gate import StepGate
from .inverses import InverseStrategy
from .mc_fisher import backpropagate_sampled_targets
from .resume import check_loadable, load_state, save_state
from .schedule import Schedule
from .selection import select_layers
from .sharing import Local, Sharing
from .step import Step

__all__ = ["Preconditioner", "ClippingWarning", "NumericalWarning", "UnsupportedLayerWarning"]


class Preconditioner(ABC):
    """Base class of every natgrad method.

    Args:
        model: the network. Every ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) not
            excluded is preconditioned; other parameters are left to the optimizer.
        optimizer: the ``torch.optim`` optimizer stepping after :meth:`step` (KL clipping
            reads its groups' ``lr``); or attach it later with :meth:`attach`.
        exclude: module qualified names (``fnmatch`` patterns, e.g. ``"head.*"``) or
            module types to leave to the optimizer unpreconditioned.
        fisher: ``"empirical"`` (output gradients of the training loss; free) or
            ``"mc"`` (Monte-Carlo "true" Fisher: call :meth:`sample_fisher` on the
            model's outputs before ``loss.backward()``).
        loss_reduction: ``"mean"`` (the loss is a batch mean; default) or ``"sum"``.
        batch_dim: the dimension of layer inputs that indexes samples (natgrad/batching.py).
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop (natgrad/amp.py).
        seed: seed of the generator that samples labels for ``fisher="mc"``.
        distributed: a :class:`natgrad.distributed.DataParallel` sharing statistics and
            inverse work across workers (docs/distributed.md); ``None``: this process.
        **hyperparameters: fields of the method's config (see ``config_class``).

    Attributes:
        layers: ``{name: LayerBlock}`` of the preconditioned layers.
        skipped: ``{name: reason}`` of supported-type layers left to the optimizer.
        damping_policy: the :class:`~natgrad.damping.DampingPolicy` (from :meth:`make_damping`).
    """

    config_class: ClassVar[type[PreconditionerConfig]] = PreconditionerConfig
    #: Config fields :meth:`configure` refuses to change (they decide what a layer stores).
    fixed_fields: ClassVar[tuple[str, ...]] = ()
    #: Settings ``build(name, model)`` without an lr adds for this method, whatever the rule.
    recommended: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        exclude: Iterable[str | type[nn.Module]] = (),
        fisher: str = "empirical",
        loss_reduction: str = "mean",
        batch_dim: int | Mapping[str, int] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        seed: int = 0,
        distributed: Sharing | None = None,
        **hyperparameters: Any,
    ) -> None:
        check_arguments(model, fisher, loss_reduction)
        self.config = self.config_class(**hyperparameters)
        self.fisher = fisher
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.schedule = Schedule()
        self._clipping = KLClipping()
        self._faults = WarnOnce()
        self._generator = torch.Generator().manual_seed(seed)
        self._gate = StepGate(grad_scaler)

        chosen, self.skipped = select_layers(model, exclude, owner=type(self).__name__)
        self.layers: dict[str, LayerBlock] = {
            name: LayerBlock.build(name, *chosen[name], self, self._faults) for name in chosen
        }
        self.quadratic_model = QuadraticModel(model, self.layers, loss_reduction, self.config)
        self.damping_policy: DampingPolicy = damping_policy(self)
        self._capture = make_capture(model, self.layers, fisher, loss_reduction, batch_dim)
        if optimizer is not None:
            self.attach(optimizer)
        self.distributed = distributed
        # Where one process and data-parallel workers differ (sharing.py); nothing else does.
        self._sharing: Sharing = Local() if distributed is None else distributed
        self._sharing.bind(type(self).__name__, self.layers)
        self._sync()

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

    def make_damping(self) -> DampingPolicy:
        """The damping policy (default: ``config.damping`` on every layer)."""
        return ConstantDamping()

    def sync_layers(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Push the config into the per-layer objects. Called after construction,
        :meth:`configure`, :meth:`load_state_dict` and every :meth:`step`; methods whose
        curvature or inverse holds settings of its own override it (default: nothing)."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Attach the optimizer whose learning rates KL clipping reads."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            kind = type(optimizer).__name__
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {kind}")
        self.optimizer = optimizer

    def configure(self, **changes: Any) -> None:
        """Change hyperparameters between steps, validated like the constructor's.

        A new ``damping`` (or ``T_inv``) takes effect at the next :meth:`step`, which then
        recomputes every inverse; ``T_cov``, ``decay`` and ``kl_clip`` apply from the next
        step on. Schedules count from step 0, so a new ``T_cov``/``T_inv`` keeps the
        phase ``steps % T``.
        """
        old = self.config
        self.config = new = old.replace(changes, self.fixed_fields, type(self).__name__)
        stale = self.damping_policy.configure(old, new)  # e.g. TKFAC's trace_floor
        if stale or new.damping != old.damping or new.T_inv != old.T_inv:
            self.schedule.stale = True
        resync_adaptive(self, old, new)
        self._sync(keep_recording=True)

    def _sync(self, *, keep_recording: bool = False) -> None:
        """The one synchronisation point: per-layer settings, then whether the next
        forward/backward pass records rows (``keep_recording``: never switch it off)."""
        self.sync_layers()
        self.quadratic_model.arm(self.config, self.steps)
        wanted = self._wants_stats(self.steps)
        self._capture.active = wanted or (keep_recording and self._capture.active)

    def _wants_stats(self, step: int) -> bool:
        inverses = (block.inverse for block in self.layers.values())
        return self.schedule.wants_stats(self.config, step, inverses)

    # ------------------------------------------------------------------ Monte-Carlo Fisher
    def sample_fisher(self, outputs: Tensor, likelihood: str = "categorical") -> None:
        """Record output gradients for the Monte-Carlo ("true") Fisher: call it after the
        forward pass, before ``loss.backward()``, with the model's outputs (logits ``(M, C)``
        or ``(M, T, C)``, or unit-variance means; natgrad/mc_fisher.py). ``.grad`` is not
        touched. A no-op when no statistics are recorded this step or fisher="empirical"."""
        self._gate.note_sampled()
        if self.fisher != "mc" or not self._capture.active:
            return
        params = [p for block in self.layers.values() for p in block.module.parameters()]
        backpropagate_sampled_targets(outputs, likelihood, self._generator, self._capture, params)

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """Update curvature/inverses on schedule and rewrite ``.grad`` into ``Δ`` (the
        phases: natgrad/step.py).

        Raises:
            RuntimeError: no gradient (call ``loss.backward()`` first), KL clipping without
                an optimizer, or a misuse natgrad/gate.py lists (a second step for one
                backward, a step after remove(), fisher="mc" without sample_fisher()).
        """
        if not Step(self).run():  # skipped (natgrad/gate.py): no statistics, .grad as it is
            return
        self.steps += 1
        self._sync()

    @property
    def kl_scale(self) -> float:
        """The KL-clipping factor ``ν`` of the last step (1.0 when clipping is off/inactive)."""
        return self._clipping.scale

    def layer_dampings(self) -> dict[str, float]:
        """Damping ``λ_l`` per layer for the coming refresh/apply (the damping policy's)."""
        return self._damping(self.damping_policy.resolve)[0]

    def block_scales(self) -> dict[str, float]:
        """The factor each layer's block is multiplied by (1.0 but for TKFAC/TEKFAC's ``β``)."""
        return self._damping(self.damping_policy.in_force)[1]

    def observe_decay(self) -> float:
        """Decay of what an inverse fits in its own basis: ``config.observe_decay()``."""
        return self.config.observe_decay()

    def _damping(self, query: Callable[..., LayerDamping]) -> LayerDamping:
        return query(self.config, self.layers, self.schedule.refreshes(self.config, self.steps))

    # ------------------------------------------------------------------ preconditioning
    def grad_matrices(self) -> dict[str, Tensor]:
        """``∇W̄`` (``(d_out, d_in')``) of every handled layer that has a gradient."""
        mats = {name: block.grad_matrix() for name, block in self.layers.items()}
        return {name: mat for name, mat in mats.items() if mat is not None}

    def precondition(
        self, grads: Mapping[str, Tensor], dampings: Mapping[str, float] | None = None
    ) -> dict[str, Tensor]:
        """``Δ_l`` for given gradient matrices ``{layer name: (d_out, d_in')}``.

        Uses the current inverses and the dampings in force (those of the last step);
        touches neither ``.grad`` nor any state, and applies no KL clipping. Layers whose
        inverse is not ready (or whose result is not finite) get their gradient back.
        """
        for name in set(grads) - set(self.layers):
            raise KeyError(f"{name!r} is not a preconditioned layer; see .layers")
        in_force, scales = self._damping(self.damping_policy.in_force)
        dampings = in_force if dampings is None else dampings
        return {n: self.layers[n].apply(g, dampings[n], scales[n]) for n, g in grads.items()}

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Current running factors ``(A, G)`` of every layer that has seen a batch,
        by qualified name, as dense tensors in docs/math.md §1's convention."""
        curvatures = {name: block.curvature for name, block in self.layers.items()}
        return {name: c.factors() for name, c in curvatures.items() if c.initialized}

    def paused(self) -> AbstractContextManager[None]:
        """``with preconditioner.paused():`` records no pass in the block (natgrad/capture.py)."""
        return self._capture.paused()

    def remove(self) -> None:
        """Remove every hook from the model; :meth:`step` then raises."""
        self._capture.remove()
        self.quadratic_model.remove()
        self._gate.removed = True

    def __repr__(self) -> str:
        return describe(self)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: step, config, per-layer state, the
        damping policy's state (plain tensors and numbers keyed by layer name)."""
        return save_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output, all checked first (:func:`check_loadable`)."""
        check_loadable(self, state)
        old, self.config = self.config, self.config_class(**state["config"])
        resync_adaptive(self, old, self.config, rebuild=True)
        load_state(self, state)
        self._capture.clear()
        self._sync()


def describe(pre: Preconditioner) -> str:
    """Config, Fisher and the preconditioned / skipped layers, one per line."""
    lines = [f"{type(pre).__name__}("]
    for field in dataclasses.fields(pre.config):
        lines.append(f"  {field.name}={getattr(pre.config, field.name)!r},")
    lines.append(f"  fisher={pre.fisher!r},")
    lines.append("  preconditioned=[")
    for name, block in pre.layers.items():
        d_out, d_in = block.shape
        lines.append(f"    {name}: {type(block.module).__name__} ∇W̄ {d_out}×{d_in},")
    lines.append("  ],")
    if pre.skipped:
        lines.append("  skipped=[")
        lines.extend(f"    {n}: {r}," for n, r in pre.skipped.items())
        lines.append("  ],")
    lines.append(")")
    return "\n".join(lines)


def make_capture(
    model: nn.Module,
    layers: Mapping[str, LayerBlock],
    fisher: str,
    loss_reduction: str,
    batch_dim: int | Mapping[str, int] | None,
) -> LayerCapture:
    """The hooks on ``layers`` (``model``'s passes delimit a tied layer's uses), each
    reading samples from its batch dimension (natgrad/batching.py)."""
    batch_dims = resolve_batch_dims(model, layers, batch_dim)
    for name, dim in batch_dims.items():
        fixed = getattr(layers[name].handler, "fixed_batch_dim", None)
        if fixed is not None and dim != fixed:
            kind = type(layers[name].module).__name__
            raise ValueError(
                f"batch_dim={dim} for layer {name!r} ({kind}): its inputs have the batch "
                f"in dimension {fixed}"
            )
    modules = {n: (block.module, block.handler) for n, block in layers.items()}
    capture = LayerCapture(modules, loss_reduction, root=model, batch_dims=batch_dims)
    capture.record_grads = fisher == "empirical"  # the MC Fisher records its own backward
    return capture


def check_arguments(model: nn.Module, fisher: str, loss_reduction: str) -> None:
    """The constructor's checks of its own (non-config) arguments."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if fisher not in ("empirical", "mc"):
        raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")


def damping_policy(pre: Preconditioner) -> DampingPolicy:
    """The method's :meth:`~Preconditioner.make_damping` policy, under
    :class:`~natgrad.adaptive.LevenbergMarquardt` when ``config.lm_damping``."""
    base = pre.make_damping()
    return LevenbergMarquardt(base, pre.quadratic_model.ratio) if pre.config.lm_damping else base


def resync_adaptive(
    pre: Preconditioner, old: PreconditionerConfig, new: PreconditionerConfig,
    rebuild: bool = False,
) -> None:
    """After a config change: the quadratic-model parts, and a new damping policy when
    ``lm_damping`` switched (or ``rebuild``)."""
    pre.quadratic_model.sync(new)
    if rebuild or new.lm_damping != old.lm_damping:
        pre.damping_policy = damping_policy(pre)
