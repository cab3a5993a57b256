"""One call of :meth:`natgrad.Preconditioner.step`, phase by phase.

A :class:`Step` is made for each call and runs its phases in order, each a method that
hands the next what it needs through the step's attributes:

1. :meth:`Step.begin` — the gradient matrices and the loss scale, after the checks of
   natgrad/gate.py (a skipped step ends here, ``.grad`` as it is);
2. :meth:`Step.fold` — this step's rows into every curvature (on ``T_cov`` steps);
3. :meth:`Step.refresh` — the inverses at the damping the policy resolves (``T_inv``);
4. :meth:`Step.observe` — the rows into what an inverse fits in its own basis (``T_s``);
5. :meth:`Step.apply` — ``Δ`` through the sharing strategy, sized by :func:`step_size`;
6. :meth:`Step.write` — ``.grad ← Δ``, and the damping policy told what the step did.

The preconditioner owns the counters and the synchronisation after a step; a step reads
the preconditioner's parts and changes the layers, the gate and the damping policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .block import LayerBlock
from .capture import LayerStats
from .clipping import learning_rates
from .damping import LayerDamping, StepRecord
from .errors import UnsupportedLayerWarning, WarnOnce

__all__ = ["Step", "step_size"]


class Step:
    """One step of ``pre`` (a :class:`~natgrad.Preconditioner`; typed loosely because that
    module imports this one).

    Attributes:
        index: the step's number (``pre.steps`` when it began).
        config: the config in force for the whole step.
        refresh_due: whether the inverses are recomputed (``T_inv``, a changed damping, …).
        grads: ``{layer: ∇W̄ (d_out, d_in')}`` as ``.grad`` held them (after unscaling).
        stats: ``{layer: LayerStats}`` recorded for this step (with ``grad`` attached).
        damping: the policy's ``(dampings, scales)`` for this step.
        deltas: ``{layer: what is written into .grad}``.
    """

    def __init__(self, pre: Any) -> None:
        self.pre = pre
        self.index: int = pre.steps
        self.config = pre.config
        self.refresh_due = False
        self.grads: dict[str, Tensor] = {}
        self.stats: dict[str, LayerStats] = {}
        self.damping: LayerDamping = ({}, {})
        self.deltas: dict[str, Tensor] = {}

    def run(self) -> bool:
        """Every phase in order; ``False`` when the step is skipped (natgrad/gate.py)."""
        if not self.begin():
            return False
        if self.pre.schedule.updates_curvature(self.config, self.index):
            self.fold()
        self.refresh()
        self.observe()
        self.apply()
        self.write()
        return True

    def begin(self) -> bool:
        """The gradient matrices and the loss scale, after the checks of natgrad/gate.py;
        then this step's rows, each with its layer's gradient matrix. ``False``: the step
        is skipped (and is left so)."""
        pre = self.pre
        for block in pre.layers.values():
            block.follow_parameters()  # model.double() / .to(device) after building
        grads = pre.grad_matrices()
        needs_samples = pre.fisher == "mc" and pre._capture.active
        scale = pre._gate.open(param_grads(pre.layers), grads, pre.optimizer, needs_samples)
        if scale is not None and scale != 1.0:
            grads = pre.grad_matrices()  # a layer with a bias copied .grad before unscale_
            pre.quadratic_model.tap.unscale(scale)
        check_ready(pre, grads)
        if scale is None:
            pre._capture.clear()
            pre._gate.close(param_grads(pre.layers))
            return False
        if pre._capture.active:
            warn_uncalled(pre._faults, grads, pre._capture.called)
        self.refresh_due = pre.schedule.refreshes(self.config, self.index)
        stats = pre._capture.pop(loss_scale=scale) if pre._capture.active else {}
        self.grads = grads
        self.stats = {name: s.with_grad(grads.get(name)) for name, s in stats.items()}
        return True

    def fold(self) -> None:
        """Fold this step's rows into every layer's curvature (through the sharing
        strategy)."""
        pre = self.pre
        for name, block in pre.layers.items():
            if name in self.stats:
                update = pre._sharing.curvature_update(block.curvature)
                block.fold(self.stats[name], self.config.decay, update)

    def refresh(self) -> None:
        """The damping policy's dampings for this step; the inverses recomputed with them
        when a refresh is due."""
        pre = self.pre
        self.damping = pre.damping_policy.resolve(self.config, pre.layers, self.refresh_due)
        if self.refresh_due:
            pre._sharing.refresh(pre.layers, self.damping[0])

    def observe(self) -> None:
        """Fold the batch into what each inverse fits in its own basis (EKFAC's ``S``), on
        the inverse's schedule, once it is ready."""
        pre = self.pre
        decay = pre.observe_decay()
        for name, block in pre.layers.items():
            observes = pre.schedule.observes(self.config, self.index, block.inverse)
            if name in self.stats and observes and block.inverse.ready:
                observation = pre._sharing.observation(block.inverse)
                block.observe(self.stats[name], decay, observation)

    def apply(self) -> None:
        """``Δ`` of every layer at the dampings in force after the refresh and observation
        (:meth:`~natgrad.damping.DampingPolicy.settle`), sized by :func:`step_size`."""
        pre, refresh = self.pre, self.refresh_due
        self.damping = pre.damping_policy.settle(self.config, pre.layers, refresh, self.damping)
        deltas = pre._sharing.precondition(pre.layers, self.grads, *self.damping)
        self.deltas = step_size(pre, self.index, self.grads, deltas, self.damping[0])

    def write(self) -> None:
        """``.grad ← Δ``; the gate remembers the gradients as this step leaves them; the
        schedule and the damping policy learn what the step did."""
        pre = self.pre
        for name, delta in self.deltas.items():
            pre.layers[name].write_grad_matrix(delta)
        pre._gate.close(param_grads(pre.layers))
        pre.schedule.stale = False
        record = StepRecord(self.index, pre.layers, self.grads, self.deltas, self.refresh_due,
                            self.damping)
        pre.damping_policy.observe_step(record)


def param_grads(layers: Mapping[str, LayerBlock]) -> dict[str, list[Tensor | None]]:
    """``{layer name: the .grad of each of its parameters}`` (natgrad/gate.py)."""
    return {name: [p.grad for p in b.module.parameters()] for name, b in layers.items()}


def warn_uncalled(faults: WarnOnce, grads: Mapping[str, Tensor], called: set[str]) -> None:
    """Warn once per layer that has a gradient although its module was never called."""
    for name in grads:
        if name not in called:
            faults.warn(
                name,
                "uncalled",
                f"layer {name!r} has a gradient but its module was never called (its "
                "weight used directly, e.g. F.linear(x, layer.weight)): natgrad cannot "
                "see its inputs, so its gradient is not preconditioned (only KL-clipped); "
                "exclude it to say so",
                UnsupportedLayerWarning,
            )


def step_size(
    pre: Any,
    step: int,
    grads: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
    dampings: Mapping[str, float],
) -> dict[str, Tensor]:
    """What :meth:`Preconditioner.step` writes into ``.grad``: with
    ``step_size="quadratic"`` the quadratic model's ``−u`` (natgrad/adaptive.py), falling
    back to ``Δ`` KL-clipped (``kl_clip``) when the model cannot be evaluated; else ``Δ``,
    KL-clipped when ``kl_clip`` is set."""
    config, model = pre.config, pre.quadratic_model
    if config.step_size == "quadratic":
        model.check_optimizer(pre.optimizer)
        update = model.update(step, grads, deltas, dampings)
        if update is not None:
            return update
        pre._faults.warn(
            "*", "quadratic",
            "the quadratic model could not size this step (no recorded forward/backward "
            "pass of the root model, or a loss that is not the likelihood's "
            f"{config.likelihood!r} negative log-likelihood); "
            + ("used the KL-clipped step" if config.kl_clip is not None else "used Δ as is"),
        )
    if config.kl_clip is None:
        return dict(deltas)
    lrs = learning_rates(pre.optimizer, {n: b.module for n, b in pre.layers.items()})
    return pre._clipping.clip(config.kl_clip, deltas, grads, lrs)


def check_ready(pre: Any, grads: Mapping[str, Tensor]) -> None:
    """Raise ``RuntimeError`` when :meth:`Preconditioner.step` cannot run."""
    if not grads:
        raise RuntimeError(
            "step() found no gradient on any preconditioned layer: call loss.backward() "
            "before step()"
        )
    adaptive = pre.config.step_size == "quadratic" or pre.config.lm_damping
    if adaptive and pre.distributed is not None:
        raise RuntimeError(
            "step_size='quadratic' and lm_damping are not supported with data parallelism "
            "yet (each worker would size its step on its own rows); use step_size='lr' and "
            "lm_damping=False with distributed="
        )
    if pre.config.kl_clip is not None and pre.optimizer is None:
        raise RuntimeError(
            "KL clipping (kl_clip set) needs the learning rate: pass optimizer= to the "
            "constructor or call attach(optimizer), or set kl_clip=None"
        )
