"""Which layers of a model a preconditioner handles: every module with a layer handler
(natgrad/layers.py) that is not excluded and that the handler supports."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable

from torch import nn

from .errors import UnsupportedLayerWarning
from .layers import LayerHandler, handler_for

__all__ = ["check_exclude", "select_layers"]


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


def select_layers(
    model: nn.Module, exclude: Iterable[str | type[nn.Module]] = (), owner: str = "natgrad"
) -> tuple[dict[str, tuple[nn.Module, LayerHandler]], dict[str, str]]:
    """``({name: (module, handler)}, {name: why it is left out})`` in module order.

    Excluded modules appear in neither; supported-type modules the handler refuses
    (grouped convolutions, …) appear in the second with the handler's reason, and an
    :class:`~natgrad.errors.UnsupportedLayerWarning` names them. ``owner`` (the method's
    name) is used in messages.

    Raises:
        ValueError: no layer is left to precondition.
    """
    exclude = check_exclude(exclude)
    chosen: dict[str, tuple[nn.Module, LayerHandler]] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        handler = handler_for(module)
        if handler is None or _excluded(name, module, exclude):
            continue
        reason = handler.unsupported_reason(module)
        if reason is not None:
            skipped[name] = reason
            continue
        chosen[name] = (module, handler)
    if skipped:
        listed = "; ".join(f"{n or '<root>'}: {r}" for n, r in skipped.items())
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
