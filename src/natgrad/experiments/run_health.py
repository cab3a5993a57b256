"""What a run records besides its numbers, so its table row can be read for what it is:
steps on which the preconditioner passed the plain gradient through (a method that fell
back is its update rule alone there), the preconditioner's numerical warnings, and the
machine's load while it trained (time ratios depend on it). All of it lives in the run's
clock, so a checkpoint carries it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from natgrad import NumericalWarning

__all__ = ["note_plain_gradient", "keep_warnings", "fallbacks", "load_average",
           "load_summary"]

#: Warnings other than numerical ones, passed on once per text and place.
_PASSED_ON: dict = {}


def note_plain_gradient(pre: Any, clock: Any) -> None:
    """Count this step in ``clock.plain_steps`` if a layer of ``pre`` that has curvature
    statistics had no inverse to apply (so its update was the plain gradient's), and add
    such layers to ``clock.plain_layers``."""
    if pre is None:
        return
    plain = [name for name, block in pre.layers.items()
             if block.curvature.initialized and not block.inverse.ready]
    if plain:
        clock.plain_steps += 1
        clock.plain_layers.extend(n for n in plain if n not in clock.plain_layers)


def keep_warnings(caught: Sequence[warnings.WarningMessage], clock: Any,
                  say: Callable[[str], None]) -> None:
    """Record the :class:`natgrad.NumericalWarning` messages in ``clock.numerical`` (once
    per text, with the step) and say them; pass any other warning on."""
    for w in caught:
        if issubclass(w.category, NumericalWarning):
            entry = {"step": clock.step, "message": str(w.message)}
            if all(e["message"] != entry["message"] for e in clock.numerical):
                clock.numerical.append(entry)
                say(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                   registry=_PASSED_ON)


def fallbacks(clock: Any) -> dict[str, Any]:
    """``meta.json``'s ``fallbacks``: where the method was not itself."""
    return {"plain_gradient_steps": clock.plain_steps,
            "plain_gradient_layers": clock.plain_layers, "warnings": clock.numerical}


def load_average() -> float | None:
    """The machine's 1-minute load average now (``None`` where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def load_summary(loads: Sequence[float]) -> dict[str, float] | None:
    """``meta.json``'s ``load_average``: min, mean, max and number of the samples."""
    if not loads:
        return None
    return {"min": min(loads), "mean": round(sum(loads) / len(loads), 2),
            "max": max(loads), "samples": len(loads)}
