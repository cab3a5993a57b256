"""Hooks that record, per layer, the batch quantities the methods need.

A forward hook keeps the layer input and puts a tensor hook on the layer output; the
tensor hook keeps the gradient that reaches the output in the next backward pass. Rows are
formed lazily, at :meth:`LayerCapture.pop`, and only on steps where the preconditioner
asked for them (:attr:`LayerCapture.active`), so ordinary steps pay nothing.

Scaling convention (docs/math.md §1): with a loss that is the *mean* over the batch, the
gradient reaching the output is ``g_i / M``; rows are multiplied by ``M`` (the size of
the input's first dimension) to give the per-sample ``g_i``. With ``loss_reduction="sum"``
they are used as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import LayerHandler

__all__ = ["LayerStats", "LayerCapture"]


@dataclass(frozen=True)
class LayerStats:
    """One layer's batch rows (docs/math.md §1).

    Attributes:
        a: input rows ``ā``, shape ``(M, P, d_in')``.
        g: per-sample output-gradient rows ``g``, shape ``(M, P, d_out)``.

    The rows may share memory with the recorded layer input or output gradient (no copy
    is made where none is needed): treat them as read-only, and copy what you keep.
    """

    a: Tensor
    g: Tensor

    @property
    def batch_size(self) -> int:
        return self.a.shape[0]

    @property
    def positions(self) -> int:
        return self.a.shape[1]

    def to(self, dtype: torch.dtype) -> LayerStats:
        return LayerStats(self.a.to(dtype), self.g.to(dtype))


class _Record:
    __slots__ = ("x", "grad")

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.grad: Tensor | None = None


def _concat(parts: list[Tensor]) -> Tensor:
    """``torch.cat`` along the batch, without the copy ``cat`` makes of a single part (the
    usual case: one forward pass per step, whose conv patch rows are the largest tensor
    of the step)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class LayerCapture:
    """Records layer inputs and output gradients for a set of named modules.

    Args:
        modules: qualified name → (module, handler), the layers to watch.
        loss_reduction: ``"mean"`` (rows of ``g`` are multiplied by the batch size) or
            ``"sum"``.

    Attributes:
        active: record on the next forward/backward pass (set by the preconditioner).
        record_grads: keep gradients reaching layer outputs. The Monte-Carlo Fisher
            turns it off for the training backward and on for its sampled backward.
    """

    def __init__(
        self, modules: dict[str, tuple[nn.Module, LayerHandler]], loss_reduction: str
    ) -> None:
        self.modules = modules
        self.loss_reduction = loss_reduction
        self.active = True
        self.record_grads = True
        self._records: dict[str, list[_Record]] = {name: [] for name in modules}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._forward_hook(name))
            for name, (module, _) in modules.items()
        ]

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (self.active and torch.is_grad_enabled() and output.requires_grad):
                return
            record = _Record(inputs[0].detach())
            self._records[name].append(record)

            def keep_grad(grad: Tensor) -> None:
                if self.record_grads:
                    record.grad = grad.detach()

            output.register_hook(keep_grad)

        return hook

    def pop(self) -> dict[str, LayerStats]:
        """Rows of every layer seen in a complete forward+backward pass since the last pop.

        Several recorded passes (e.g. micro-batches) are concatenated along the batch.
        Layers with no complete pass are absent from the result.
        """
        stats: dict[str, LayerStats] = {}
        for name, records in self._records.items():
            complete = [r for r in records if r.grad is not None]
            records.clear()
            if not complete:
                continue
            module, handler = self.modules[name]
            a_parts, g_parts = [], []
            for r in complete:
                a_parts.append(handler.input_rows(module, r.x))
                g = handler.output_grad_rows(module, r.grad)
                if self.loss_reduction == "mean":
                    g = g * g.shape[0]
                g_parts.append(g)
            stats[name] = LayerStats(_concat(a_parts), _concat(g_parts))
        return stats

    def clear(self) -> None:
        for records in self._records.values():
            records.clear()

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)
