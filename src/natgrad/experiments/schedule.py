"""Learning-rate schedules as a multiplier of each method's base learning rate.

Text form (``--lr-schedule``): ``constant``; ``step:every=40,gamma=0.1`` (every 40 epochs)
or ``step:every_steps=16000,gamma=0.1``; ``cosine`` or ``cosine:warmup=5`` (linear
warm-up over 5 epochs, then cosine annealing to 0 at the end of the epoch budget).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["LRSchedule", "parse_schedule"]

_KINDS = ("constant", "step", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Attributes:
        kind: ``"constant"``, ``"step"`` or ``"cosine"``.
        gamma: step decay factor (``step``).
        every: epochs between decays (``step``; 0 = use ``every_steps``).
        every_steps: optimizer steps between decays (``step``; used when ``every`` is 0).
        warmup: epochs of linear warm-up from 0 (any kind).
    """

    kind: str = "constant"
    gamma: float = 0.1
    every: float = 0.0
    every_steps: int = 0
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"schedule kind must be one of {_KINDS}, got {self.kind!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.every < 0 or self.every_steps < 0 or self.warmup < 0:
            raise ValueError("every, every_steps and warmup must be >= 0, got "
                             f"{self.every}, {self.every_steps}, {self.warmup}")
        if self.kind == "step" and self.every == 0 and self.every_steps == 0:
            raise ValueError("a step schedule needs every=EPOCHS or every_steps=STEPS")

    def needs_epochs(self) -> bool:
        return self.kind == "cosine"

    def factor(self, step: int, steps_per_epoch: int, total_steps: int | None) -> float:
        """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
        epoch = step / steps_per_epoch
        warm = 1.0
        if self.warmup > 0 and epoch < self.warmup:
            warm = (step + 1) / (self.warmup * steps_per_epoch)
        if self.kind == "constant":
            return warm
        if self.kind == "step":
            if self.every > 0:
                drops = math.floor(epoch / self.every + 1e-9)
            else:
                drops = step // self.every_steps
            return warm * self.gamma**drops
        if total_steps is None:
            raise ValueError("a cosine schedule needs an epoch budget (--epochs)")
        start = self.warmup * steps_per_epoch
        progress = min(1.0, max(0.0, (step - start) / max(1.0, total_steps - start)))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.kind == "constant" and not self.warmup:
            return "constant"
        parts = []
        if self.kind == "step":
            parts.append(f"every={self.every:g}" if self.every else
                         f"every_steps={self.every_steps}")
            parts.append(f"gamma={self.gamma:g}")
        if self.warmup:
            parts.append(f"warmup={self.warmup:g}")
        return self.kind + (":" + ",".join(parts) if parts else "")


def parse_schedule(text: str) -> LRSchedule:
    """Parse ``--lr-schedule`` text (see the module docstring).

    Raises:
        ValueError: unknown kind or key, or a bad value, naming it.
    """
    kind, _, rest = text.strip().partition(":")
    kwargs: dict = {}
    types = {"gamma": float, "every": float, "every_steps": int, "warmup": float}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise ValueError(
                f"--lr-schedule item {item!r}: expected KEY=VALUE with KEY in {sorted(types)}"
            )
        try:
            kwargs[key] = types[key](value)
        except ValueError:
            raise ValueError(f"--lr-schedule {key} must be a number, got {value!r}") from None
    return LRSchedule(kind=kind, **kwargs)
