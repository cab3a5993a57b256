"""A preconditioner's state: what ``state_dict`` saves, how ``load_state_dict`` restores
it, and what it checks before it changes anything.

A checkpoint of another model (other widths), another method or another inverse must be
refused with the layer and the shapes named, and leave the preconditioner as it was. The
per-layer state is therefore first loaded into *copies* of each layer's curvature and
inverse, and those copies are asked what the real ones would be asked in ``step()``:
their dense factors must have the layer's shapes, and a ready inverse must turn a
gradient matrix ``(d_out, d_in')`` into one of the same shape.

The functions that take ``pre`` take a :class:`~natgrad.Preconditioner` (typed loosely:
its module imports this one).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "STATE_VERSION",
    "check_fixed_settings",
    "check_layer_state",
    "check_loadable",
    "check_state",
    "load_state",
    "save_state",
]

STATE_VERSION = 1


def check_fixed_settings(
    saved: Mapping[str, Any], current: Mapping[str, Any], fixed: Iterable[str]
) -> None:
    """Raise ``ValueError`` when a setting that decides what a layer stores (K-FAC's
    ``inverse``) differs between the saved config and this preconditioner's."""
    for key in fixed:
        if key in saved and saved[key] != current.get(key):
            raise ValueError(
                f"state was saved with {key}={saved[key]!r}; this preconditioner has "
                f"{key}={current.get(key)!r}, which decides what each layer stores: build it "
                f"with {key}={saved[key]!r} to load this state"
            )


def check_layer_state(
    name: str, shape: tuple[int, int], curvature: Any, inverse: Any, saved: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` naming layer ``name`` unless ``saved`` (``{"curvature": ...,
    "inverse": ...}``) loads into ``curvature`` and ``inverse`` and fits a layer whose
    gradient matrix has ``shape`` ``(d_out, d_in')``. Neither object is changed."""
    d_out, d_in = shape
    try:
        curvature_copy = copy.deepcopy(curvature)
        inverse_copy = copy.deepcopy(inverse)
        curvature_copy.load_state_dict(dict(saved["curvature"]))
        inverse_copy.load_state_dict(dict(saved["inverse"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"layer {name!r}: saved state does not fit: {err}") from None
    if curvature_copy.initialized:
        A, G = curvature_copy.factors()
        if tuple(A.shape) != (d_in, d_in) or tuple(G.shape) != (d_out, d_out):
            raise ValueError(
                f"layer {name!r}: saved factors A {tuple(A.shape)}, G {tuple(G.shape)}; this "
                f"layer's gradient matrix is {d_out}×{d_in}, so A ({d_in}, {d_in}) and "
                f"G ({d_out}, {d_out})"
            )
    if inverse_copy.ready:
        probe = torch.zeros(d_out, d_in, dtype=inverse_copy.dtype, device=inverse_copy.device)
        try:
            out = inverse_copy.apply(probe, 1.0)
        except RuntimeError as err:
            raise ValueError(
                f"layer {name!r}: saved inverse does not fit a {d_out}×{d_in} gradient: {err}"
            ) from None
        if tuple(out.shape) != (d_out, d_in):
            raise ValueError(
                f"layer {name!r}: saved inverse maps a {d_out}×{d_in} gradient to "
                f"{tuple(out.shape)}"
            )


def save_state(pre: Any) -> dict[str, Any]:
    """:meth:`~natgrad.Preconditioner.state_dict`."""
    policy = pre.damping_policy
    state = {
        "version": STATE_VERSION,
        "method": type(pre).__name__,
        "steps": pre.steps,
        "stale": pre.schedule.stale,
        "config": pre.config.as_dict(),
        "generator": pre._generator.get_state(),
        "layers": {name: block.state_dict() for name, block in pre.layers.items()},
    }
    if policy.state_key is not None:
        state[policy.state_key] = policy.state_dict()
    state["quadratic_step"] = pre.quadratic_model.state_dict()
    return state


def load_state(pre: Any, state: Mapping[str, Any]) -> None:
    """The counters, per-layer and damping state of
    :meth:`~natgrad.Preconditioner.load_state_dict`."""
    for name, block in pre.layers.items():
        block.load_state_dict(state["layers"][name])
    pre.steps = int(state["steps"])
    pre.schedule.stale = bool(state["stale"])
    pre._generator.set_state(state["generator"])
    if pre.damping_policy.state_key is not None:
        pre.damping_policy.load_state_dict(state.get(pre.damping_policy.state_key))
    pre.quadratic_model.load_state_dict(state.get("quadratic_step"))


def check_loadable(pre: Any, state: Mapping[str, Any]) -> None:
    """Every check of :meth:`~natgrad.Preconditioner.load_state_dict`, before it changes anything:
    version, method, layer names, config, fixed settings, each layer's state and shapes."""
    check_state(state, type(pre).__name__, pre.layers)
    missing = sorted({"steps", "stale", "config", "generator"} - set(state))
    if missing:
        raise ValueError(f"state is missing {missing}: not a complete state_dict()")
    pre.config_class(**state["config"])
    check_fixed_settings(state["config"], pre.config.as_dict(), pre.fixed_fields)
    for name, block in pre.layers.items():
        saved = state["layers"][name]
        check_layer_state(name, block.shape, block.curvature, block.inverse, saved)


def check_state(state: Mapping[str, Any], method: str, layers: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``state`` is a :meth:`~natgrad.Preconditioner.state_dict` of this
    version, by ``method``, over exactly ``layers``."""
    version = state.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"unsupported state version {version!r}; expected {STATE_VERSION}")
    if state.get("method") != method:
        raise ValueError(f"state was saved by {state.get('method')!r}, not {method!r}")
    saved, ours = set(state["layers"]), set(layers)
    if saved != ours:
        raise ValueError(
            f"saved layers do not match this model's: missing {sorted(ours - saved)}, "
            f"unexpected {sorted(saved - ours)}"
        )
