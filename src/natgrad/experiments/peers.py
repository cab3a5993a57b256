"""Optional competitor baselines from heavyball (``pip install natgrad[peers]``): SOAP and
Shampoo, measured in the same ``natgrad bench`` run as the K-FAC family.

heavyball 3.x ships Shampoo as ``KLShampoo`` (Shampoo with KL-corrected factor
accumulation); that is what ``shampoo`` means here. heavyball's ``torch.compile`` fusion
is switched off so a one-time compilation never lands on the training clock (and CPU-only
machines need no compiler); both use their own defaults except ``weight_decay``, which
follows ``--weight-decay`` (0 unless set) like every other method.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["PEERS", "missing_reason", "build_peer", "peer_fields"]

#: Spec name → (heavyball class name, default learning rate).
PEERS: dict[str, tuple[str, float]] = {
    "soap": ("SOAP", 3e-3),
    "shampoo": ("KLShampoo", 3e-3),
}


def _heavyball():
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    if hasattr(heavyball.utils, "compile_mode_recommended_to_none"):
        heavyball.utils.compile_mode_recommended_to_none = None
    return heavyball


def missing_reason(name: str) -> str | None:
    """``None`` when peer ``name`` can be built, else why not (one line)."""
    try:
        hb = _heavyball()
    except ImportError:
        return (
            f"{name}: heavyball is not installed (pip install 'natgrad[peers]' or "
            "pip install heavyball)"
        )
    if not hasattr(hb, PEERS[name][0]):
        return f"{name}: this heavyball version has no {PEERS[name][0]}"
    return None


def peer_fields(name: str) -> set[str]:
    """Keyword arguments the peer's optimizer accepts (besides ``params``)."""
    cls = getattr(_heavyball(), PEERS[name][0])
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")}


def build_peer(
    name: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build heavyball's optimizer for peer ``name``."""
    cls = getattr(_heavyball(), PEERS[name][0])
    return cls(list(params), lr=lr, weight_decay=weight_decay, **kwargs)
