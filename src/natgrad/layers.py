"""What a layer *gives*: its input rows and output-gradient rows, in one format.

Every method in natgrad is written once against the reshaped format
``[batch M, positions P, features]`` (MATH.md, Notation):

* ``a`` rows, shape ``(M, P, d_in')``: the homogeneous input ``ā = [a; 1]`` when the
  layer has a bias (``d_in' = d_in + 1``), else ``a``. For ``Conv2d`` a row is one
  unfolded patch ``⟦a⟧`` and ``P = |T|`` is the number of output positions.
* ``g`` rows, shape ``(M, P, d_out)``: per-sample output gradients ``g_i = ∂ℓ_i/∂s_i``.
* the gradient matrix ``∇W̄``, shape ``(d_out, d_in')``: ``[∇W, ∇b]`` with a conv weight
  reshaped to ``c_out × (c_in·k_h·k_w)``.

``nn.Linear`` applied to inputs with extra leading dimensions ``(M, *S, d_in)`` is treated
exactly like a convolution whose output positions are the ``prod(S)`` entries of ``S``
(weight sharing over positions, KFC's convention): the first dimension is the batch.

Layer types are looked up in :data:`LAYER_HANDLERS`; register a handler there to teach
every method a new layer type.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerHandler",
    "WeightBiasHandler",
    "LinearHandler",
    "Conv2dHandler",
    "LAYER_HANDLERS",
    "handler_for",
    "patch_rows",
]


class LayerHandler(Protocol):
    """How one layer type exposes rows and its gradient matrix."""

    #: ``"fully_connected"`` or ``"convolution"`` (see :class:`WeightBiasHandler`).
    kind: str

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` if natgrad can precondition ``module``, else why not (one line)."""

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """Layer input ``x`` → rows ``ā`` of shape ``(M, P, d_in')``."""

    def output_grad_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """``∂L/∂s`` with the layer output's shape → rows of shape ``(M, P, d_out)``."""

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in')`` of the gradient matrix ``∇W̄``."""

    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """The layer's gradient matrix ``∇W̄`` ``(d_out, d_in')`` from its parameters'
        ``.grad``; ``None`` when the layer has no gradient."""

    def write_grad_matrix(self, module: nn.Module, mat: Tensor) -> None:
        """Write ``mat`` ``(d_out, d_in')`` back into the parameters' ``.grad``."""


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def _append_ones(rows: Tensor) -> Tensor:
    ones = rows.new_ones(rows.shape[:-1] + (1,))
    return torch.cat([rows, ones], dim=-1)


def _derived_weight(module: nn.Module) -> str | None:
    """Why a ``weight`` that is not a parameter of the module cannot be preconditioned."""
    if "weight" in module._parameters:
        return None
    return (
        "its weight is computed from other parameters (weight_norm, a parametrization): "
        "the gradient belongs to those, and Δ for the weight cannot be written there"
    )


class WeightBiasHandler:
    """Shared by layers whose parameters are a ``weight`` of shape ``(d_out, …)`` and an
    optional ``bias`` of shape ``(d_out,)``: how ``∇W̄ = [∇W, ∇b]`` is read and written."""

    #: Layer kind, for rules that treat kinds differently (TKFAC's damping):
    #: ``"fully_connected"`` or ``"convolution"``.
    kind: str = "fully_connected"

    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """``∇W̄ = [∇W, ∇b]`` of shape ``(d_out, d_in')`` from ``.grad``; ``None`` if unset."""
        weight_grad = module.weight.grad
        if weight_grad is None:
            return None
        mat = weight_grad.reshape(weight_grad.shape[0], -1)
        if _has_bias(module):
            bias_grad = module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(module.bias)
            mat = torch.cat([mat, bias_grad.unsqueeze(1)], dim=1)
        return mat

    def write_grad_matrix(self, module: nn.Module, mat: Tensor) -> None:
        """Write ``mat`` (``(d_out, d_in')``) back into ``weight.grad`` and ``bias.grad``."""
        weight = module.weight
        d_w = weight[0].numel()
        weight.grad.copy_(mat[:, :d_w].reshape(weight.shape))
        if _has_bias(module):
            if module.bias.grad is None:
                module.bias.grad = torch.zeros_like(module.bias)
            module.bias.grad.copy_(mat[:, d_w])


class LinearHandler(WeightBiasHandler):
    """``nn.Linear``: one row per sample, or per position for inputs ``(M, *S, d_in)``."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return _derived_weight(module)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        rows = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
        return _append_ones(rows) if _has_bias(module) else rows

    def output_grad_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        g = grad_output
        return g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, 1, -1)

    def shape(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features + int(_has_bias(module))


def patch_rows(
    x: Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
    homogeneous: bool,
) -> Tensor:
    """Unfolded patches ``⟦a⟧`` of ``x`` ``(M, c_in, H, W)`` as rows ``(M, |T|, d_in')``.

    Row ``t`` of sample ``i`` is the patch under output position ``t`` (row-major over the
    output grid), its features in ``F.unfold``'s order ``(c_in, k_h, k_w)`` (the order of
    the reshaped weight ``c_out × (c_in·k_h·k_w)``), followed by a 1 when ``homogeneous``.
    Equal to ``F.unfold(x, ...).transpose(1, 2)`` with the ones column appended, but the
    patches are gathered from a strided window view straight into their final layout:
    ``F.unfold`` and the transpose/append would each write the whole ``(M, |T|, d_in')``
    block once more, and on statistics steps that block is the largest tensor there is.
    """
    (k_h, k_w), (d_h, d_w), (p_h, p_w), (s_h, s_w) = kernel_size, dilation, padding, stride
    if p_h or p_w:
        x = F.pad(x, (p_w, p_w, p_h, p_h))
    m, c_in, height, width = x.shape
    out_h = (height - d_h * (k_h - 1) - 1) // s_h + 1
    out_w = (width - d_w * (k_w - 1) - 1) // s_w + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x: a padded input of {height}×{width} is smaller than the dilated kernel "
            f"{d_h * (k_h - 1) + 1}×{d_w * (k_w - 1) + 1}; it has no output positions"
        )
    st_m, st_c, st_h, st_w = x.stride()
    windows = x.as_strided(
        (m, out_h, out_w, c_in, k_h, k_w),
        (st_m, st_h * s_h, st_w * s_w, st_c, st_h * d_h, st_w * d_w),
        x.storage_offset(),
    )
    d_in = c_in * k_h * k_w
    rows = x.new_empty(m, out_h * out_w, d_in + int(homogeneous))
    rows[..., :d_in].unflatten(2, (c_in, k_h, k_w)).unflatten(1, (out_h, out_w)).copy_(windows)
    if homogeneous:
        rows[..., d_in] = 1
    return rows


def _same_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            return None  # asymmetric: unfold cannot express it
        pads.append(total // 2)
    return pads[0], pads[1]


class Conv2dHandler(WeightBiasHandler):
    """``nn.Conv2d`` (KFC): rows are unfolded patches, one per sample and output position."""

    kind = "convolution"
    #: Inputs are ``(M, c_in, H, W)``: samples are dimension 0, whatever ``batch_dim`` says.
    fixed_batch_dim = 0

    def _padding(self, module: nn.Conv2d) -> tuple[int, int] | None:
        if module.padding == "valid":
            return 0, 0
        if module.padding == "same":
            return _same_padding(module)
        return tuple(module.padding)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if _derived_weight(module):
            return _derived_weight(module)
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}); only groups=1 is supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}; only 'zeros' is supported"
        if self._padding(module) is None:
            return "padding='same' with an even kernel extent (asymmetric padding)"
        return None

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return patch_rows(
            x,
            kernel_size=module.kernel_size,
            dilation=module.dilation,
            padding=self._padding(module),
            stride=module.stride,
            homogeneous=_has_bias(module),
        )

    def output_grad_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        g = grad_output if grad_output.dim() == 4 else grad_output.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)  # (M, |T|, c_out)

    def shape(self, module: nn.Module) -> tuple[int, int]:
        c_in = module.in_channels // module.groups
        d_in = c_in * math.prod(module.kernel_size)
        return module.out_channels, d_in + int(_has_bias(module))


#: Layer type → handler. Exact types first; subclasses fall back to their nearest base.
LAYER_HANDLERS: dict[type[nn.Module], LayerHandler] = {
    nn.Linear: LinearHandler(),
    nn.Conv2d: Conv2dHandler(),
}


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``'s type (or nearest registered base), else ``None``."""
    for cls in type(module).__mro__:
        if cls in LAYER_HANDLERS:
            return LAYER_HANDLERS[cls]
    return None
