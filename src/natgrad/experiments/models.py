"""Models used by the papers' experiments, written here (no torchvision).

Every builder in :data:`MODELS` takes ``(in_channels, num_classes, image_size)`` so any
model runs on any dataset.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "ImageNetResNet",
    "build_model",
    "mlp",
    "fmnist_cnn",
    "resnet",
    "imagenet_resnet",
    "vgg",
    "count_parameters",
]


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


# ---------------------------------------------------------------------- CIFAR ResNets
class _BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity shortcut. When the block halves the
    resolution and doubles the width, the shortcut subsamples and zero-pads channels
    (He et al. 2016, CIFAR option A: parameter-free, which gives ResNet-20 its 0.27M)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al. 2016, §4.2): a 3×3 conv to 16 channels, three stages
    of ``n`` basic blocks at 16/32/64 channels (stride 2 entering stages 2 and 3), global
    average pooling, one linear classifier."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(depth: int, in_channels: int = 3, num_classes: int = 10, image_size: int = 32
           ) -> ResNet:
    """CIFAR ResNet of the given depth (20, 32, 56, ...); any image size works."""
    del image_size  # global average pooling makes the network size-agnostic
    return ResNet(depth, in_channels, num_classes)


# ---------------------------------------------------------------------- ImageNet ResNets
class _ImageNetBasicBlock(nn.Module):
    """Two 3×3 conv–BN layers (stride on the first); expansion 1."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride, as most ImageNet codebases do; the parameter
    count is the same either way), 1×1 expand to ``4·planes``, each followed by BN."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a strided 1×1 conv + BN (He et al. 2016,
    option B)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


#: depth → (block, blocks per stage) of He et al. 2016, Table 1.
_IMAGENET_RESNETS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    34: (_ImageNetBasicBlock, (3, 4, 6, 3)),
    50: (_Bottleneck, (3, 4, 6, 3)),
}


class ImageNetResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016, Table 1): 7×7 stride-2 conv to 64 channels, BN,
    ReLU, 3×3 stride-2 max-pool; four stages at 64/128/256/512 planes (stride 2 entering
    stages 2–4; basic blocks for ResNet-34, bottlenecks ×4 for ResNet-50) with projection
    shortcuts where the shape changes; global average pooling; one linear classifier.
    For 1000 classes: 21,797,672 (ResNet-34) and 25,557,032 (ResNet-50) parameters."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        if depth not in _IMAGENET_RESNETS:
            raise ValueError(
                f"depth must be one of {sorted(_IMAGENET_RESNETS)} for an ImageNet ResNet, "
                f"got {depth}"
            )
        block, counts = _IMAGENET_RESNETS[depth]
        self.conv = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Module] = []
        in_planes = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks: list[nn.Module] = []
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn(self.conv(x))))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def imagenet_resnet(
    depth: int, in_channels: int = 3, num_classes: int = 1000, image_size: int = 224
) -> ImageNetResNet:
    """ImageNet-style ResNet-34 or -50; any image size works (global average pooling;
    inputs below 32×32 reach the last stage at 1×1)."""
    del image_size
    return ImageNetResNet(depth, in_channels, num_classes)


# ---------------------------------------------------------------------- VGG with BN
_VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),
}


def vgg(depth: int, in_channels: int = 3, num_classes: int = 10, image_size: int = 32
        ) -> nn.Sequential:
    """VGG-11/16 with batch norm after every 3×3 conv (Simonyan & Zisserman 2015, CIFAR
    form: one linear classifier 512 → classes). A max-pool that would shrink the image
    below 1×1 is left out, so small images (28×28, 8×8) work too."""
    if depth not in _VGG_CONFIGS:
        raise ValueError(f"depth must be one of {sorted(_VGG_CONFIGS)}, got {depth}")
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for item in _VGG_CONFIGS[depth]:
        if item == "M":
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        layers += [
            nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
            nn.BatchNorm2d(int(item)),
            nn.ReLU(inplace=True),
        ]
        channels = int(item)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- by name
def _mlp(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return mlp(in_channels * image_size * image_size, num_classes)


#: Model name → builder ``(in_channels, num_classes, image_size) → nn.Module``.
MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": fmnist_cnn,
    "resnet20": lambda c, k, s: resnet(20, c, k, s),
    "resnet32": lambda c, k, s: resnet(32, c, k, s),
    "resnet56": lambda c, k, s: resnet(56, c, k, s),
    "resnet34": lambda c, k, s: imagenet_resnet(34, c, k, s),
    "resnet50": lambda c, k, s: imagenet_resnet(50, c, k, s),
    "vgg11": lambda c, k, s: vgg(11, c, k, s),
    "vgg16": lambda c, k, s: vgg(16, c, k, s),
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a model of :data:`MODELS` by name for images ``(in_channels, S, S)``.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](in_channels, num_classes, image_size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
