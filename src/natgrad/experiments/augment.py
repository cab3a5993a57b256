"""The papers' CIFAR augmentation on batches of tensors: random crop after zero padding,
then a random horizontal flip (He et al. 2016, used by Liu, Gao & Wang 2021 and Gao et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_crop_flip"]


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Pad ``(B, C, H, W)`` images by ``pad`` zeros per side, crop a random ``H × W`` window
    per image, and flip each image left–right with probability 1/2.

    Zero padding happens on normalised images, i.e. pads with the channel mean. All
    randomness comes from ``generator`` so every method sees the same augmented batches.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offsets[0].view(b, 1) + torch.arange(h).view(1, h)  # (B, H)
    cols = offsets[1].view(b, 1) + torch.arange(w).view(1, w)  # (B, W)
    cols = torch.where(flips.view(b, 1), cols.flip(1), cols)
    batch = torch.arange(b).view(b, 1, 1)
    # Advanced indexing over (batch, row, col) puts the channel axis last: (B, H, W, C).
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()
