"""Declared, typed state for per-layer objects, so ``state_dict`` is never a pickle.

A subclass sets ``dtype`` and ``device`` (where loaded tensors go) and lists the
attribute names that make up its state in ``_state_keys``; each is
a tensor, a number or ``None``. :meth:`state_dict` returns them (tensors cloned) and
:meth:`load_state_dict` restores them, checking shapes against the current values.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

__all__ = ["Stateful"]


class Stateful:
    _state_keys: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self._state_keys:
            value = getattr(self, key)
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
        return out

    def load_state_dict(self, state: dict[str, Any], *, partial: bool = False) -> None:
        """Restore :meth:`state_dict` output (tensors moved to ``device``/``dtype``).

        ``partial=True`` loads only the keys present, without the shape check: values a peer
        computed for this same object (data-parallel broadcasts after a refresh, whose
        shapes may differ from the ones held here).
        """
        missing = [k for k in self._state_keys if k not in state]
        if missing and not partial:
            raise KeyError(f"{type(self).__name__} state is missing {missing}")
        unknown = [k for k in state if k not in self._state_keys]
        if unknown and partial:
            raise KeyError(f"{type(self).__name__} state has unknown keys {unknown}")
        for key in self._state_keys:
            if key not in state:
                continue
            value = state[key]
            current = getattr(self, key)
            if isinstance(value, torch.Tensor):
                if (
                    not partial
                    and isinstance(current, torch.Tensor)
                    and current.shape != value.shape
                ):
                    raise ValueError(
                        f"{type(self).__name__}.{key}: saved shape {tuple(value.shape)} "
                        f"does not match {tuple(current.shape)}"
                    )
                value = value.to(device=self.device).clone()
                if value.is_floating_point():
                    value = value.to(self.dtype)
            setattr(self, key, value)
