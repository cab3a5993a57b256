"""What ``load_state_dict`` checks before it changes anything.

A checkpoint of another model (other widths), another method or another inverse must be
refused with the layer and the shapes named, and leave the preconditioner as it was. The
per-layer state is therefore first loaded into *copies* of each layer's curvature and
inverse, and those copies are asked what the real ones would be asked in ``step()``:
their dense factors must have the layer's shapes, and a ready inverse must turn a
gradient matrix ``(d_out, d_in')`` into one of the same shape.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["check_fixed_settings", "check_layer_state"]


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
