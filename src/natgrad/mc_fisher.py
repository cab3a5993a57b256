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
    ``(M, C)`` or ``(M, T, C)`` → class indices ``(M,)`` or ``(M, T)``) or ``"gaussian"``
    (unit-variance means, same shape as ``outputs``)."""
    with torch.no_grad():
        if likelihood == "categorical":
            probs = F.softmax(outputs.detach().float().cpu().flatten(0, -2), dim=-1)
            target = torch.multinomial(probs, 1, generator=generator)
            return target.reshape(outputs.shape[:-1]).to(outputs.device)
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return outputs.detach() + noise.to(outputs.device)


def backpropagate_sampled_targets(
    outputs: Tensor,
    likelihood: str,
    generator: torch.Generator,
    capture: LayerCapture,
    params: Sequence[nn.Parameter],
) -> None:
    """Sample targets, then backpropagate their summed loss to ``params`` with ``capture``
    recording the output gradients as per-sample gradients; keeps the graph.

    The loss is a sum (each sample's gradient as it is, whatever the training loss's
    reduction), so that passes accumulated over micro-batches need no rescaling.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
    target = sample_targets(outputs, likelihood, generator)
    if likelihood == "categorical":
        loss = F.cross_entropy(outputs.flatten(0, -2), target.flatten(), reduction="sum")
    else:
        loss = 0.5 * F.mse_loss(outputs, target, reduction="sum")
    with capture.per_sample_grads():
        torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
