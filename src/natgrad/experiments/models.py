"""Models used by the papers' experiments, written here (no torchvision)."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp", "fmnist_cnn"]


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (128, 128)) -> nn.Sequential:
    """Fully connected ReLU network: ``in → hidden… → num_classes`` (inputs are flattened)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def fmnist_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """The Fashion-MNIST CNN: conv 1→32 5×5 pad 2, ReLU, max-pool 2; conv 32→64 5×5 pad 2,
    ReLU, max-pool 2; linear 3136→256, ReLU; linear 256→10 (for 28×28 inputs)."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )
