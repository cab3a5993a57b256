"""Which dimension of a layer's input indexes samples (the batch dimension).

Rows are ``[batch M, positions P, features]`` (``layers.py``); natgrad reads ``M`` from
one dimension of each layer's input and output gradient. It is the first dimension,
except for

* layers given another one with ``batch_dim`` (an int for every layer, or
  ``{module name pattern: dim}``; ``fnmatch`` patterns as ``exclude`` takes), and
* the feed-forward ``nn.Linear`` layers of PyTorch's own Transformer layers built with
  ``batch_first=False`` (their default), whose inputs are ``(T, M, d)``: dimension 1.

Every other dimension of a Linear input is a position (weight sharing, KFC's convention).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from torch import nn

__all__ = ["resolve_batch_dims", "SEQUENCE_FIRST_PARENTS"]

#: Module types whose ``batch_first=False`` makes the ``nn.Linear`` children they call
#: see ``(T, M, d)`` inputs.
SEQUENCE_FIRST_PARENTS: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _sequence_first(model: nn.Module) -> dict[str, int]:
    out = {}
    for parent_name, parent in model.named_modules():
        # These layers keep the flag on their attention block.
        if isinstance(parent, SEQUENCE_FIRST_PARENTS) and not parent.self_attn.batch_first:
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    out[f"{parent_name}.{child_name}" if parent_name else child_name] = 1
    return out


def resolve_batch_dims(
    model: nn.Module, layer_names: Iterable[str], batch_dim: int | Mapping[str, int] | None
) -> dict[str, int]:
    """The batch dimension of each named layer of ``model``.

    Args:
        model: the network the names refer to.
        layer_names: qualified names of the preconditioned layers.
        batch_dim: ``None`` (the first dimension, and 1 for the Linear layers of
            sequence-first PyTorch Transformer layers), an int for every layer, or
            ``{name pattern: dim}`` overriding those defaults for the layers it matches.

    Raises:
        TypeError/ValueError: a dimension that is not a non-negative int, or a pattern
            that matches no preconditioned layer.
    """
    names = list(layer_names)
    dims = {name: 0 for name in names} | {
        n: d for n, d in _sequence_first(model).items() if n in names
    }
    if batch_dim is None:
        return dims
    if isinstance(batch_dim, Mapping):
        overrides = dict(batch_dim)
    else:
        overrides = {"*": batch_dim}
    for pattern, dim in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"batch_dim keys must be module names/patterns (str), got {pattern!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(
                f"batch_dim must be a non-negative int (or a dict of them), got {dim!r}"
                + ("" if pattern == "*" else f" for {pattern!r}")
            )
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(
                f"batch_dim pattern {pattern!r} matches no preconditioned layer; "
                f"layers: {names}"
            )
        for name in matched:
            dims[name] = dim
    return dims
