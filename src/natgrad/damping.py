"""Damping policies: which ``λ_l`` (and block scale) each layer gets for the coming step.

A preconditioner holds one :class:`DampingPolicy`, built by its method's
:meth:`~natgrad.Preconditioner.make_damping`: :class:`ConstantDamping` (``config.damping``
on every layer; the default) or :class:`TraceDamping`, TKFAC's and TEKFAC's trace-based
adaptive damping for CNNs (docs/math.md §6; Gao et al. 2020, eqs. 3.4–3.5, after Gao et
al. 2021, §5):

* Fully connected networks (no preconditioned ``Conv2d``): a constant ``λ`` (``damping``).
* Convolutional layers of a CNN: ``λ_l = max{tr F̂_l, ϑ} / dim F̂_l``, the block's mean
  eigenvalue with the trace floor ``ϑ`` (``trace_floor``); ``dim F̂_l = d_out·d_in'``.
  ``tr F̂_l`` is ``tr Θ_l`` for TEKFAC and ``tr(δ Φ⊗Ψ) = δ`` for TKFAC (TKFAC's own §5
  formula was not recoverable; docs/math.md §9.4 fixes this choice).
* Fully connected layers of a CNN: their block is scaled by
  ``β = max over conv layers of max{tr F̂_l, ϑ} / dim F̂_l`` "to keep pace with the
  convolution layers", with the constant ``λ``: ``Δ = (β F̂_l + λI)⁻¹ ∇W̄``. Since
  ``(β F̂ + λI)⁻¹ = (1/β)(F̂ + (λ/β) I)⁻¹`` this is the layer's own inverse at damping
  ``λ/β`` divided by ``β``; for TKFAC's factored form the same identity holds factor by
  factor: ``sqrt(β)(sqrt(δ)Φ + sqrt(λ/β)I) = sqrt(βδ)Φ + sqrt(λ)I``. So the rule is
  implemented by the damping ``λ/β`` plus the block scale ``β`` (``Δ`` is divided by it,
  :meth:`natgrad.block.LayerBlock.apply`).

A policy that adapts ``λ`` from how the last steps went (Levenberg–Marquardt: the
reduction ratio of actual to predicted loss change) reads each step through
:meth:`DampingPolicy.observe_step`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from .config import PreconditionerConfig, check_positive

if TYPE_CHECKING:
    from .block import LayerBlock

__all__ = [
    "ConstantDamping",
    "DampingPolicy",
    "HeldDamping",
    "LayerDamping",
    "StepRecord",
    "TraceDamping",
    "TraceDampingConfig",
]

#: ``({layer: λ_l}, {layer: block scale})`` for one step.
LayerDamping = tuple[dict[str, float], dict[str, float]]


@dataclass(kw_only=True)
class TraceDampingConfig(PreconditionerConfig):
    """Adds to :class:`~natgrad.config.PreconditionerConfig`:

    Attributes:
        trace_floor: ``ϑ`` (> 0), the floor of ``tr F̂_l`` in the conv damping
            (Gao et al. 2020: best 0.01 over {1e-4 … 100} on ResNet-20/CIFAR-100).
        adaptive_damping: use the trace-based rule in CNNs (``False``: the constant
            ``damping`` on every layer, as in fully connected networks).
    """

    trace_floor: float = 0.01
    adaptive_damping: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("trace_floor", self.trace_floor)
        if not isinstance(self.adaptive_damping, bool):
            raise ValueError(
                f"adaptive_damping must be True or False, got {self.adaptive_damping!r}"
            )


@dataclass(frozen=True)
class StepRecord:
    """What one :meth:`~natgrad.Preconditioner.step` did, for policies that learn from it.

    Attributes:
        step: the step's index (``steps`` before it).
        blocks: the preconditioned layers.
        grads: ``∇W̄_l`` ``(d_out, d_in')`` before preconditioning.
        deltas: the ``Δ_l`` written to ``.grad`` (KL clipping included).
        refreshed: whether the inverses were recomputed this step.
        damping: the ``(λ_l, scale_l)`` used.
    """

    step: int
    blocks: Mapping[str, LayerBlock]
    grads: Mapping[str, Tensor]
    deltas: Mapping[str, Tensor]
    refreshed: bool
    damping: LayerDamping


class DampingPolicy(ABC):
    """Per-layer damping ``λ_l`` and block scale for the coming step.

    The preconditioner calls :meth:`resolve` once per step (told whether the step
    refreshes the inverses), :meth:`in_force` for :meth:`~natgrad.Preconditioner.precondition`
    between steps, :meth:`configure` when hyperparameters change, and :meth:`observe_step`
    after each step.
    """

    #: Key under which :meth:`state_dict` is saved in the preconditioner's state
    #: (``None``: the policy has no state).
    state_key: ClassVar[str | None] = None

    @abstractmethod
    def resolve(
        self, config: PreconditionerConfig, blocks: Mapping[str, LayerBlock], refresh: bool
    ) -> LayerDamping:
        """``(λ_l, scale_l)`` for the coming step, which then are in force."""

    def in_force(
        self, config: PreconditionerConfig, blocks: Mapping[str, LayerBlock], refresh: bool
    ) -> LayerDamping:
        """Those of the last step (those inside the inverses); :meth:`resolve` if none yet."""
        return self.resolve(config, blocks, refresh)

    def settle(
        self,
        config: PreconditionerConfig,
        blocks: Mapping[str, LayerBlock],
        refresh: bool,
        resolved: LayerDamping,
    ) -> LayerDamping:
        """The damping this step preconditions with, asked once the step's statistics are
        all in (curvature update, refresh, re-scaling observation); ``resolved`` is what
        :meth:`resolve` gave before them (and the refresh used). Default: ``resolved``."""
        return resolved

    def configure(self, old: PreconditionerConfig, new: PreconditionerConfig) -> bool:
        """Told of a hyperparameter change; ``True`` when every inverse must be recomputed
        (beyond a change of ``damping``, which always does)."""
        return False

    def observe_step(self, record: StepRecord) -> None:  # noqa: B027 - optional hook
        """After each step (an adaptive policy adjusts ``λ`` here; default: nothing)."""

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:  # noqa: B027 - stateless by default
        """Restore :meth:`state_dict` output."""


class HeldDamping(DampingPolicy):
    """A policy that holds the ``(λ_l, scale_l)`` it last resolved in ``_in_force`` (the
    damping inside the inverses) and answers :meth:`in_force` with a copy of it."""

    _in_force: LayerDamping | None = None

    def in_force(self, config, blocks, refresh) -> LayerDamping:
        if self._in_force is None:
            return self.resolve(config, blocks, refresh)
        return dict(self._in_force[0]), dict(self._in_force[1])


class ConstantDamping(DampingPolicy):
    """``λ_l = config.damping`` on every layer, no block scale."""

    def resolve(self, config, blocks, refresh) -> LayerDamping:
        return {name: config.damping for name in blocks}, {name: 1.0 for name in blocks}


class TraceDamping(HeldDamping):
    """The trace-based rule of the module docstring, for a :class:`TraceDampingConfig`.

    Args:
        block_trace: ``tr F̂_l`` of one block, or ``None`` before its first statistics
            (TKFAC: ``δ``; TEKFAC: ``tr Θ_l``).

    When an inverse fixes the damping at each refresh
    (:attr:`~natgrad.inverses.InverseStrategy.damping_in_refresh`, TKFAC's explicit
    inverses), ``λ_l`` and ``β`` are recomputed only on refresh steps, so that the ``β``
    dividing ``Δ`` always matches the damping inside the inverse; otherwise every step.
    """

    state_key = "trace_damping"

    def __init__(self, block_trace: Callable[[LayerBlock], float | None]) -> None:
        self.block_trace = block_trace
        self._in_force: LayerDamping | None = None

    def rule(self, config: TraceDampingConfig, blocks: Mapping[str, LayerBlock]) -> LayerDamping:
        """``({name: λ_l}, {name: scale})`` by the rule in the module docstring."""
        base = config.damping
        dampings = {name: base for name in blocks}
        scales = {name: 1.0 for name in blocks}
        conv = [n for n, block in blocks.items() if block.handler.kind == "convolution"]
        if not (config.adaptive_damping and conv):
            return dampings, scales
        mean_eig = {}
        for name in conv:
            trace = self.block_trace(blocks[name])
            if trace is not None and math.isfinite(trace):
                d_out, d_in = blocks[name].shape
                mean_eig[name] = max(trace, config.trace_floor) / (d_out * d_in)
        if not mean_eig:
            return dampings, scales
        beta = max(mean_eig.values())
        for name in blocks:
            if name in conv:
                dampings[name] = mean_eig.get(name, base)
            else:
                dampings[name], scales[name] = base / beta, beta
        return dampings, scales

    def resolve(self, config, blocks, refresh) -> LayerDamping:
        baked = any(block.inverse.damping_in_refresh for block in blocks.values())
        if self._in_force is None or not baked or refresh:
            self._in_force = self.rule(config, blocks)
        return dict(self._in_force[0]), dict(self._in_force[1])

    def settle(self, config, blocks, refresh, resolved) -> LayerDamping:
        """Recomputed from this step's statistics when no inverse bakes the damping in
        (TEKFAC: ``tr Θ`` of the re-scaling just observed, so step 0 already uses it and no
        step lags one observation; docs/math.md §6); else the refresh's own."""
        if any(block.inverse.damping_in_refresh for block in blocks.values()):
            return resolved
        self._in_force = self.rule(config, blocks)
        return dict(self._in_force[0]), dict(self._in_force[1])

    def configure(self, old, new) -> bool:
        """A new ``trace_floor`` or ``adaptive_damping`` recomputes every inverse."""
        changed = (old.trace_floor, old.adaptive_damping) != (new.trace_floor, new.adaptive_damping)
        if changed:
            self._in_force = None
        return changed

    def state_dict(self) -> LayerDamping | None:
        """The dampings and scales in force (TKFAC bakes them into its inverses at refresh,
        so a resumed run must reuse them)."""
        cached = self._in_force
        return None if cached is None else (dict(cached[0]), dict(cached[1]))

    def load_state_dict(self, state: LayerDamping | None) -> None:
        self._in_force = None if state is None else (dict(state[0]), dict(state[1]))
