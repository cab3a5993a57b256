"""Hooks that record, per layer, the batch quantities the methods need.

A forward hook on each layer puts a tensor hook on the layer output; the tensor hook
receives the gradient that reaches the output in a backward pass. Rows are formed
lazily, at :meth:`LayerCapture.pop`, and only on steps where the preconditioner asked for
them (:attr:`LayerCapture.active`), so ordinary steps pay nothing. What is recorded, for
each situation a training loop meets:

* **Which forward passes.** Those of a layer in training mode, with gradients enabled,
  whose output requires grad and that has a trainable parameter, while recording is not
  :meth:`~LayerCapture.paused`. Evaluation passes (``model.eval()``, ``torch.no_grad()``)
  and frozen layers are never recorded.
* **Which backward passes.** Only one that computes a gradient of the layer's own
  parameters (``loss.backward()``, or ``torch.autograd.grad`` with respect to them):
  a backward for an input gradient (``torch.autograd.grad(loss, x)``, adversarial
  examples, gradient penalties on inputs) is ignored. Several backward passes through one
  forward (``retain_graph=True``) add up, as ``.grad`` does.
* **How long inputs are kept.** A layer input waiting for its backward is held by the
  output's autograd graph (which already keeps it for the weight gradient), not by the
  capture: a pass no backward follows is freed with its graph. A completed pass is kept
  until :meth:`~LayerCapture.pop` (the preconditioner's step), or dropped at the layer's
  next forward pass once the parameter gradients it explains were cleared
  (``zero_grad()``): the step that would have used it never came. So a preconditioner
  that is never stepped holds at most one batch (with ``zero_grad(set_to_none=False)``
  the gradient tensors stay, and passes are kept until the next step).
* **One batch per step (gradient accumulation).** Every pass completed since the last pop
  is one batch of ``M`` samples, ``M`` the sum of the passes' batch sizes: micro-batches
  whose losses are divided by their number, or one loss over several forward passes,
  give the factors of the full batch. A layer used several times in one forward pass of
  the model (a tied layer) sees the same samples each time: its uses are positions of
  those samples (as if its inputs were stacked), not more samples.
* **The batch dimension** is the first dimension of a layer's input unless
  ``batch_dims`` names another (sequence-first inputs ``(T, M, d)``:
  :func:`natgrad.batching.resolve_batch_dims`).
* **Copies and pickles.** The hooks hold their capture and module weakly and check the
  module's identity: a ``copy.deepcopy`` of the model (an EMA or teacher copy) carries
  inert hooks and never feeds the original, and ``torch.save(model)`` /
  ``torch.save(preconditioner)`` pickle (a loaded model alone has inert hooks; a loaded
  preconditioner records on its own loaded model).

Scaling convention (docs/math.md §1): with a loss that is the *mean* over the batch,
the gradient reaching the output is ``g_i / M``; rows are multiplied by ``M`` to give the
per-sample ``g_i``. With ``loss_reduction="sum"``, and for gradients recorded under
:meth:`~LayerCapture.per_sample_grads` (a summed loss such as the sampled Fisher's), they
are used as they are.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import LayerHandler

__all__ = ["LayerStats", "LayerCapture"]


@dataclass(frozen=True)
class LayerStats:
    """One layer's batch rows (docs/math.md §1), and its gradient matrix of the step.

    Attributes:
        a: input rows ``ā``, shape ``(M, P, d_in')``.
        g: per-sample output-gradient rows ``g``, shape ``(M, P, d_out)``.
        grad: the layer's gradient matrix ``∇W̄`` ``(d_out, d_in')`` as ``.grad`` holds it
            when ``step()`` folds these rows (after a GradScaler's unscale, before ``Δ``
            is written): for an estimate that is not a function of the rows (a diagonal
            ``E[∇W̄ ⊙ ∇W̄]``, Shampoo's ``∇W̄ ∇W̄ᵀ`` and ``∇W̄ᵀ ∇W̄``). The preconditioner
            fills it for every layer it hands statistics to; ``None`` where rows alone are
            passed (a hand-built ``LayerStats``).

    The tensors may share memory with the recorded layer input or output gradient and
    with ``.grad`` (no copy is made where none is needed): treat them as read-only, and
    copy what you keep.
    """

    a: Tensor
    g: Tensor
    grad: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.a.shape[0]

    @property
    def positions(self) -> int:
        return self.a.shape[1]

    def to(self, dtype: torch.dtype) -> LayerStats:
        grad = None if self.grad is None else self.grad.to(dtype)
        return LayerStats(self.a.to(dtype), self.g.to(dtype), grad)

    def with_grad(self, grad: Tensor | None) -> LayerStats:
        """The same rows with ``grad`` (``(d_out, d_in')`` or ``None``) attached."""
        return replace(self, grad=grad)


class _Pass:
    """One recorded forward pass of one layer and the gradient that reached its output.

    ``grad`` is ``None`` until a backward pass arrives (and again once the pass has been
    popped or dropped); ``pass_id`` tells which forward pass of the model it belongs to,
    ``order`` its place among all recorded forward passes (backward runs in reverse);
    ``summed`` marks a gradient of a summed loss (used as it is); ``accumulated`` marks a
    gradient that was also accumulated into the parameters' ``.grad``.
    """

    __slots__ = ("x", "grad", "pass_id", "order", "summed", "accumulated")

    def __init__(self, x: Tensor, pass_id: int, order: int) -> None:
        self.x = x
        self.pass_id = pass_id
        self.order = order
        self.grad: Tensor | None = None
        self.summed = False
        self.accumulated = False


def _concat(parts: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat``, without the copy ``cat`` makes of a single part (the usual case: one
    forward pass per step, whose conv patch rows are the largest tensor of the step)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _dead_ref() -> None:
    return None


def _weak(obj: Any):
    return _dead_ref if obj is None else weakref.ref(obj)


def _parameter_grad_computed(params: list[nn.Parameter]) -> bool | None:
    """In a running backward: does it compute a gradient of any of ``params``?

    ``True``: accumulated into ``.grad`` (``backward()``); ``False``: returned by
    ``torch.autograd.grad`` instead; ``None``: not computed (an input-gradient pass).
    """
    computed = None
    for p in params:
        node = torch.autograd.graph.get_gradient_edge(p).node
        try:
            if torch._C._will_engine_execute_node(node):
                return True
        except RuntimeError:
            # autograd.grad(...) asks for this leaf's gradient: the engine captures it
            # rather than running the leaf's node, and says so by refusing the query.
            computed = False
    return computed


class _LayerHook:
    """The forward hook on one layer (a picklable object, not a closure).

    Holds its capture and module weakly: the model never keeps a preconditioner alive,
    and a copy of the model (``copy.deepcopy``) whose hooks point at a copy of the
    capture that nothing holds, or a shallow copy that shares this hook, records nothing.
    """

    def __init__(self, capture: LayerCapture | None, name: str, module: nn.Module) -> None:
        self._capture = _weak(capture)
        self._module = _weak(module)
        self.name = name

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        capture = self._capture()
        if capture is not None and module is self._module():
            capture._forward(self.name, module, args, kwargs, output)

    def __reduce__(self):
        return (_LayerHook, (self._capture(), self.name, self._module()))


class _RootHook:
    """Forward pre-hook (``enter=True``) and hook on the model: marks one forward pass of
    the model, so that a layer used twice within it is told apart from two passes."""

    def __init__(self, capture: LayerCapture | None, enter: bool) -> None:
        self._capture = _weak(capture)
        self.enter = enter

    def __call__(self, module: nn.Module, *args: Any) -> None:
        capture = self._capture()
        if capture is not None:
            capture._model_pass(self.enter)

    def __reduce__(self):
        return (_RootHook, (self._capture(), self.enter))


class LayerCapture:
    """Records layer inputs and output gradients for a set of named modules.

    Args:
        modules: qualified name → (module, handler), the layers to watch.
        loss_reduction: ``"mean"`` (rows of ``g`` are multiplied by the batch size) or
            ``"sum"``.
        root: the model the layers belong to; its forward passes delimit the uses of a
            tied layer. Without it, every call of a layer counts as a pass of its own.
        batch_dims: qualified name → the dimension of that layer's input and output
            that indexes samples (default 0 for every layer).

    Attributes:
        active: record on the next forward/backward pass (set by the preconditioner).
        called: names of the layers whose module has been called at least once (a layer
            whose weight is only used directly, ``F.linear(x, layer.weight)``, never is).
        record_grads: keep gradients of the training loss reaching layer outputs. The
            Monte-Carlo Fisher turns it off and records its sampled backward under
            :meth:`per_sample_grads`.
    """

    def __init__(
        self,
        modules: dict[str, tuple[nn.Module, LayerHandler]],
        loss_reduction: str,
        *,
        root: nn.Module | None = None,
        batch_dims: Mapping[str, int] | None = None,
    ) -> None:
        self.modules = modules
        self.loss_reduction = loss_reduction
        self.batch_dims = {name: 0 for name in modules} | dict(batch_dims or {})
        self.active = True
        self.record_grads = True
        self.called: set[str] = set()
        self._paused = 0
        self._summed = 0
        self._done: dict[str, list[_Pass]] = {name: [] for name in modules}
        self._model_depth = 0
        self._pass_count = 0
        self._forward_count = 0
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(_LayerHook(self, name, module), with_kwargs=True)
            for name, (module, _) in modules.items()
        ]
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(_RootHook(self, True)))
            self._handles.append(
                root.register_forward_hook(_RootHook(self, False), always_call=True)
            )

    # ------------------------------------------------------------------ hooks
    def _model_pass(self, enter: bool) -> None:
        if enter:
            if self._model_depth == 0:
                self._pass_count += 1
            self._model_depth += 1
        else:
            self._model_depth = max(self._model_depth - 1, 0)

    def _pass_id(self) -> int:
        if self._model_depth == 0:  # a layer called outside a forward pass of the model
            self._pass_count += 1
        return self._pass_count

    def _forward(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if name not in self.called:
            self.called.add(name)
        if not (self.active and not self._paused and module.training):
            return
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:  # frozen layer: no gradient to precondition
            return
        done = self._done[name]
        if done and all(p.grad is None for p in params):
            # The gradients these passes explained were cleared (zero_grad) without a
            # step: they belong to no coming step.
            kept = [r for r in done if not r.accumulated]
            for r in done:
                if r.accumulated:
                    r.grad = None
            done[:] = kept
        x = args[0] if args else kwargs["input"]
        batch_dim = self.batch_dims[name]
        if x.dim() <= batch_dim:
            raise ValueError(
                f"layer {name!r}: batch_dim={batch_dim} but its input has shape "
                f"{tuple(x.shape)}; set batch_dim to the dimension that indexes samples"
            )
        self._forward_count += 1
        record = _Pass(x.detach(), self._pass_id(), self._forward_count)
        # The tensor hook (and with it the input) lives as long as the output's graph.
        output.register_hook(_GradHook(self, name, record, params))

    def _backward(self, name: str, record: _Pass, params: list[nn.Parameter], grad: Tensor):
        summed = self._summed > 0
        if self._paused or not (self.record_grads or summed):
            return
        computed = _parameter_grad_computed(params)
        if computed is None:
            return
        if record.grad is None:
            record.grad = grad.detach()
            record.summed = summed
            record.accumulated = computed
            self._done[name].append(record)
        else:  # another backward through the same forward pass: gradients add up
            record.grad = record.grad + grad.detach()
            record.accumulated = record.accumulated or computed

    # ------------------------------------------------------------------ user controls
    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block: neither forward passes nor gradients."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def per_sample_grads(self) -> Iterator[None]:
        """Record the gradients of backward passes in the block as per-sample gradients
        (a summed loss: not multiplied by the batch size), even with ``record_grads``
        off. The Monte-Carlo Fisher's sampled backward runs in it."""
        self._summed += 1
        try:
            yield
        finally:
            self._summed -= 1

    # ------------------------------------------------------------------ rows
    def pop(self, *, loss_scale: float = 1.0) -> dict[str, LayerStats]:
        """Rows of every layer with a complete forward+backward pass since the last pop.

        The passes form one batch (see the module docstring). ``loss_scale``: the factor
        the training loss was multiplied by before its backward (a ``GradScaler``'s
        scale); gradients of that loss are divided by it. Layers with no complete pass
        are absent from the result.

        Raises:
            ValueError: passes of one layer whose rows cannot form one batch (different
                numbers of positions per sample, e.g. sequences of other lengths).
        """
        stats: dict[str, LayerStats] = {}
        for name, done in self._done.items():
            if not done:
                continue
            records = list(done)
            done.clear()
            try:
                stats[name] = self._rows(name, records, loss_scale)
            finally:
                for r in records:
                    r.grad = None
        return stats

    def _rows(self, name: str, records: list[_Pass], loss_scale: float) -> LayerStats:
        module, handler = self.modules[name]
        batch_dim = self.batch_dims[name]
        by_pass: dict[int, list[_Pass]] = {}
        for r in sorted(records, key=lambda r: r.order):
            by_pass.setdefault(r.pass_id, []).append(r)
        # Uses of one layer within one forward pass of the model see the same samples:
        # their rows are more positions of those samples. Otherwise more samples.
        groups: list[list[_Pass]] = []
        for uses in by_pass.values():
            if len({r.x.shape[batch_dim] for r in uses}) == 1:
                groups.append(uses)
            else:
                groups.extend([r] for r in uses)
        batch = sum(uses[0].x.shape[batch_dim] for uses in groups)

        def sample_first(t: Tensor) -> Tensor:
            return t if batch_dim == 0 else t.movedim(batch_dim, 0)

        a_parts, g_parts = [], []
        for uses in groups:
            a, g = [], []
            for r in uses:
                a.append(handler.input_rows(module, sample_first(r.x)))
                rows = handler.output_grad_rows(module, sample_first(r.grad))
                if r.summed:
                    scale = 1.0
                else:
                    scale = (batch if self.loss_reduction == "mean" else 1.0) / loss_scale
                g.append(rows if scale == 1.0 else rows * scale)
            a_parts.append(_concat(a, 1))
            g_parts.append(_concat(g, 1))
        positions = {t.shape[1] for t in a_parts}
        if len(positions) > 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in a_parts)
            raise ValueError(
                f"layer {name!r}: the passes recorded since the last step have input rows "
                f"{shapes} (samples, positions, features); one batch needs the same "
                "number of positions per sample. Step after each such pass, or pad them "
                "to one length."
            )
        return LayerStats(_concat(a_parts), _concat(g_parts))

    def clear(self) -> None:
        """Forget every completed pass."""
        for done in self._done.values():
            for r in done:
                r.grad = None
            done.clear()

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __getstate__(self) -> dict[str, Any]:
        # A pickle or copy holds no recorded passes (they belong to this process's
        # graphs) and is neither paused nor inside a forward pass.
        state = self.__dict__.copy()
        state["_done"] = {name: [] for name in self._done}
        state["_paused"] = state["_summed"] = state["_model_depth"] = 0
        return state


class _GradHook:
    """The tensor hook on one recorded layer output; it alone holds the pass's input."""

    __slots__ = ("capture", "name", "record", "params")

    def __init__(
        self, capture: LayerCapture, name: str, record: _Pass, params: list[nn.Parameter]
    ) -> None:
        self.capture, self.name, self.record, self.params = capture, name, record, params

    def __call__(self, grad: Tensor) -> None:
        self.capture._backward(self.name, self.record, self.params, grad)
