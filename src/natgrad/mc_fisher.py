"""Monte-Carlo ("true") Fisher: output gradients of targets sampled from the model.

:func:`backpropagate_sampled_targets` samples targets from the model's predictive
distribution and backpropagates their loss to the watched parameters' layer outputs,
where the capture hooks record them; ``.grad`` is not touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import LayerCapture

__all__ = ["LIKELIHOODS", "backpropagate_sampled_targets", "sample_targets"]

LIKELIHOODS = ("categorical", "gaussian")


def sample_targets(outputs: Tensor, likelihood: str, generator: torch.Generator) -> Tensor:
    """Targets drawn from the model's predictive distribution: ``"categorical"`` (logits
    ``(M, C)`` → class indices ``(M,)``) or ``"gaussian"`` (unit-variance means, same shape
    as ``outputs``)."""
    with torch.no_grad():
        if likelihood == "categorical":
            probs = F.softmax(outputs.detach().float().cpu(), dim=-1)
            target = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            return target.to(outputs.device)
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return outputs.detach() + noise.to(outputs.device)


def backpropagate_sampled_targets(
    outputs: Tensor,
    likelihood: str,
    generator: torch.Generator,
    capture: LayerCapture,
    params: Sequence[nn.Parameter],
) -> None:
    """Sample targets, then backpropagate their loss (reduced like the training loss) to
    ``params`` with ``capture`` recording the output gradients; keeps the graph."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
    target = sample_targets(outputs, likelihood, generator)
    if likelihood == "categorical":
        loss = F.cross_entropy(outputs, target, reduction=capture.loss_reduction)
    else:
        loss = 0.5 * F.mse_loss(outputs, target, reduction="sum")
        if capture.loss_reduction == "mean":
            loss = loss / outputs.shape[0]
    capture.record_grads = True
    try:
        torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    finally:
        capture.record_grads = False
