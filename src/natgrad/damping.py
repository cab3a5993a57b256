"""TKFAC's and TEKFAC's trace-based adaptive damping for CNNs (MATH.md, TKFAC and TEKFAC;
``004_…`` eqs. 3.4–3.5, after Gao et al. 2020 §5).

* Fully connected networks (no preconditioned ``Conv2d``): a constant ``λ`` (``damping``).
* Convolutional layers of a CNN: ``λ_l = max{tr F̂_l, ϑ} / dim F̂_l``, the block's mean
  eigenvalue with the trace floor ``ϑ`` (``trace_floor``); ``dim F̂_l = d_out·d_in'``.
  ``tr F̂_l`` is ``tr Θ_l`` for TEKFAC and ``tr(δ Φ⊗Ψ) = δ`` for TKFAC (TKFAC's own §5
  formula was not recoverable; MATH.md fixes this choice).
* Fully connected layers of a CNN: their block is scaled by
  ``β = max over conv layers of max{tr F̂_l, ϑ} / dim F̂_l`` "to keep pace with the
  convolution layers", with the constant ``λ``: ``Δ = (β F̂_l + λI)⁻¹ ∇W̄``. Since
  ``(β F̂ + λI)⁻¹ = (1/β)(F̂ + (λ/β) I)⁻¹`` this is the layer's own inverse at damping
  ``λ/β`` divided by ``β``; for TKFAC's factored form the same identity holds factor by
  factor: ``sqrt(β)(sqrt(δ)Φ + sqrt(λ/β)I) = sqrt(βδ)Φ + sqrt(λ)I``. So the rule is
  implemented by :meth:`layer_dampings` (``λ/β``) plus a division of ``Δ`` by ``β`` in
  :meth:`precondition` — nothing in the shared preconditioner changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from .config import PreconditionerConfig, check_positive

__all__ = ["TraceDampingConfig", "TraceAdaptiveDamping"]


@dataclass(kw_only=True)
class TraceDampingConfig(PreconditionerConfig):
    """Adds to :class:`~natgrad.config.PreconditionerConfig`:

    Attributes:
        trace_floor: ``ϑ`` (> 0), the floor of ``tr F̂_l`` in the conv damping
            (``004_…``: best 0.01 over {1e-4 … 100} on ResNet-20/CIFAR-100).
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


class TraceAdaptiveDamping:
    """Mixin for a :class:`~natgrad.Preconditioner` whose config is a
    :class:`TraceDampingConfig`: overrides :meth:`layer_dampings` and :meth:`precondition`.

    A subclass provides :meth:`block_trace` (``tr F̂_l`` of one layer, or ``None`` before
    its first statistics) and says with :attr:`damping_baked_at_refresh` whether its
    inverse fixes the damping at each refresh (TKFAC's explicit inverses); then ``λ_l``
    and ``β`` are recomputed only on refresh steps, so that the ``β`` dividing ``Δ``
    always matches the damping inside the inverse.
    """

    damping_baked_at_refresh: ClassVar[bool] = False

    def block_trace(self, name: str) -> float | None:
        raise NotImplementedError

    def _trace_rule(self) -> tuple[dict[str, float], dict[str, float]]:
        """``({name: λ_l}, {name: scale})`` by the rule in the module docstring."""
        base = self.config.damping
        dampings = {name: base for name in self.layers}
        scales = {name: 1.0 for name in self.layers}
        conv = [n for n, layer in self.layers.items() if isinstance(layer.module, nn.Conv2d)]
        if not (self.config.adaptive_damping and conv):
            return dampings, scales
        mean_eig = {}
        for name in conv:
            trace = self.block_trace(name)
            if trace is not None and math.isfinite(trace):
                d_out, d_in = self.layers[name].handler.shape(self.layers[name].module)
                mean_eig[name] = max(trace, self.config.trace_floor) / (d_out * d_in)
        if not mean_eig:
            return dampings, scales
        beta = max(mean_eig.values())
        for name in self.layers:
            if name in conv:
                dampings[name] = mean_eig.get(name, base)
            else:
                dampings[name], scales[name] = base / beta, beta
        return dampings, scales

    def layer_dampings(self) -> dict[str, float]:
        """``λ_l`` per layer: see the module docstring (``λ/β`` for FC layers of a CNN)."""
        cached = getattr(self, "_trace_damping", None)
        if cached is None or not self.damping_baked_at_refresh or self._refreshes(self.steps):
            cached = self._trace_rule()
            self._trace_damping = cached
        return dict(cached[0])

    def block_scales(self) -> dict[str, float]:
        """The factor each layer's block is multiplied by (``β`` for FC layers of a CNN)."""
        if getattr(self, "_trace_damping", None) is None:
            self.layer_dampings()
        return dict(self._trace_damping[1])

    def precondition(
        self, grads: Mapping[str, Tensor], dampings: Mapping[str, float] | None = None
    ) -> dict[str, Tensor]:
        """The base :meth:`~natgrad.Preconditioner.precondition`, then ``Δ_l / β`` for the
        fully connected layers of a CNN (their block is ``β F̂_l``).

        Called between steps without ``dampings``, it uses the ``λ_l`` and ``β`` of the
        last step (those inside the inverses), and changes nothing.
        """
        if dampings is None:
            cached = getattr(self, "_trace_damping", None)
            dampings = self.layer_dampings() if cached is None else dict(cached[0])
        deltas = super().precondition(grads, dampings)
        scales = self.block_scales()
        for name in deltas:
            if scales[name] != 1.0 and self.layers[name].inverse.ready:
                deltas[name] = deltas[name] / scales[name]
        return deltas

    def configure(self, **changes) -> None:
        """As :meth:`~natgrad.Preconditioner.configure`; a new ``trace_floor`` or
        ``adaptive_damping`` recomputes every inverse at the next step, like a new
        ``damping``."""
        before = (self.config.trace_floor, self.config.adaptive_damping)
        super().configure(**changes)
        if (self.config.trace_floor, self.config.adaptive_damping) != before:
            self._stale = True
            self._trace_damping = None
            self._capture.active = self._capture.active or self._wants_stats(self.steps)

    def state_dict(self) -> dict:
        """The base state plus the dampings and scales in force (TKFAC bakes them into its
        inverses at refresh, so a resumed run must reuse them)."""
        state = super().state_dict()
        cached = getattr(self, "_trace_damping", None)
        state["trace_damping"] = None if cached is None else (dict(cached[0]), dict(cached[1]))
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        cached = state.get("trace_damping")
        self._trace_damping = None if cached is None else (dict(cached[0]), dict(cached[1]))
