"""Which layers of a model a preconditioner handles: every module with a layer handler
(natgrad/layers.py) that is not excluded, not frozen, and that the handler supports.

What is listed is what is preconditioned: a Linear that nn.MultiheadAttention uses
through its weight (``out_proj``), a weight computed from other parameters (weight_norm),
and weight layers without a handler (Conv1d, Conv3d, transposed convolutions, Bilinear)
are listed as skipped, with one :class:`~natgrad.errors.UnsupportedLayerWarning` naming
them all. An ``exclude`` pattern that matches no module is an error (a typo would
otherwise be silent)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable

from torch import nn

from .errors import UnsupportedLayerWarning
from .layers import LayerHandler, handler_for

__all__ = ["FROZEN", "UNHANDLED_WEIGHT_LAYERS", "check_exclude", "select_layers"]

#: The reason given for a layer none of whose parameters requires grad (no warning:
#: freezing is deliberate; unfreezing later does not make it preconditioned).
FROZEN = "frozen (no parameter requires grad): not preconditioned"


def check_exclude(exclude: Iterable[str | type[nn.Module]]) -> tuple:
    """``exclude`` as a tuple of ``fnmatch`` patterns (str) and ``nn.Module`` types."""
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


#: Layer types natgrad has no handler for but that a user may expect preconditioned
#: (their weights are a linear map of the input): they are listed as skipped, with a warning.
UNHANDLED_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Bilinear,
)


def _skip_reason(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> str | None:
    """Why a module natgrad has no handler for, or whose handler it must not use, is left
    to the optimizer; ``None`` when nothing needs saying."""
    parent = parents.get(name.rpartition(".")[0]) if name else None
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "used by nn.MultiheadAttention through its weight, without calling the module: "
            "natgrad cannot see its inputs"
        )
    if handler_for(module) is None and isinstance(module, UNHANDLED_WEIGHT_LAYERS):
        return f"{type(module).__name__}: no layer handler (natgrad.LAYER_HANDLERS)"
    return None


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _check_patterns_match(exclude: tuple, names: list[str]) -> None:
    for item in exclude:
        if isinstance(item, str) and not any(fnmatch.fnmatchcase(n, item) for n in names):
            raise ValueError(
                f"exclude pattern {item!r} matches no module of the model (a typo?); "
                f"module names look like {names[1:4]}"
            )


def select_layers(
    model: nn.Module, exclude: Iterable[str | type[nn.Module]] = (), owner: str = "natgrad"
) -> tuple[dict[str, tuple[nn.Module, LayerHandler]], dict[str, str]]:
    """``({name: (module, handler)}, {name: why it is left out})`` in module order.

    Excluded modules appear in neither; modules the handler refuses (grouped
    convolutions, derived weights, …), multi-head attention's ``out_proj`` and weight
    layers without a handler appear in the second with the reason, and one
    :class:`~natgrad.errors.UnsupportedLayerWarning` names them; frozen layers appear
    there too, without a warning. ``owner`` (the method's name) is used in messages.

    Raises:
        ValueError: no layer is left to precondition, or an ``exclude`` pattern matches
            no module.
    """
    exclude = check_exclude(exclude)
    modules = dict(model.named_modules())
    _check_patterns_match(exclude, list(modules))
    chosen: dict[str, tuple[nn.Module, LayerHandler]] = {}
    skipped: dict[str, str] = {}
    for name, module in modules.items():
        if _excluded(name, module, exclude):
            continue
        handler = handler_for(module)
        reason = _skip_reason(name, module, modules)
        if reason is None and handler is not None:
            reason = handler.unsupported_reason(module)
        if reason is not None:
            skipped[name] = reason
        elif handler is not None and _frozen(module):
            skipped[name] = FROZEN
        elif handler is not None:
            chosen[name] = (module, handler)
    unsupported = {n: r for n, r in skipped.items() if r != FROZEN}
    if unsupported:
        listed = "; ".join(f"{n or '<root>'}: {r}" for n, r in unsupported.items())
        warnings.warn(
            f"{owner} leaves these layers to the optimizer unpreconditioned: {listed}",
            UnsupportedLayerWarning,
            stacklevel=3,
        )
    if not chosen:
        raise ValueError(
            f"model has no layer {owner} can precondition: it needs at "
            "least one nn.Linear or nn.Conv2d (groups=1) that is not excluded"
        )
    return chosen, skipped
