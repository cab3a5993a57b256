"""Experiment models: output shapes on every image size used, parameter counts against
the architectures' closed forms, and the ResNet option-A shortcut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.experiments.models import MODELS, build_model, count_parameters, resnet, vgg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels, size, classes", [(3, 32, 100), (1, 28, 10), (1, 8, 10)])
def test_output_shape(name, channels, size, classes):
    model = build_model(name, channels, classes, size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


def _conv(c_in, c_out, k, bias):
    return c_out * c_in * k * k + (c_out if bias else 0)


def _bn(c):
    return 2 * c


def _resnet_count(depth: int, classes: int = 10) -> int:
    n = (depth - 2) // 6
    total = _conv(3, 16, 3, False) + _bn(16)
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += _conv(c_in, c, 3, False) + _bn(c) + _conv(c, c, 3, False) + _bn(c)
            c_in = c
    return total + 64 * classes + classes


def _vgg_count(cfg, classes: int = 10) -> int:
    total, c_in = 0, 3
    for c in cfg:
        total += _conv(c_in, c, 3, False) + _bn(c)
        c_in = c
    return total + 512 * classes + classes


@pytest.mark.parametrize("depth, approx", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6)])
def test_resnet_parameter_counts(depth, approx):
    count = count_parameters(build_model(f"resnet{depth}", 3, 10, 32))
    assert count == _resnet_count(depth)
    assert abs(count - approx) / approx < 0.01  # He et al. 2016, Table 6


def test_vgg_and_small_model_parameter_counts():
    vgg11 = (64, 128, 256, 256, 512, 512, 512, 512)
    vgg16 = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    assert count_parameters(build_model("vgg11", 3, 10, 32)) == _vgg_count(vgg11)
    assert count_parameters(build_model("vgg16", 3, 10, 32)) == _vgg_count(vgg16)
    cnn = _conv(1, 32, 5, True) + _conv(32, 64, 5, True) + 3136 * 256 + 256 + 256 * 10 + 10
    assert count_parameters(build_model("cnn", 1, 10, 28)) == cnn
    mlp = 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert count_parameters(build_model("mlp", 1, 10, 28)) == mlp


def test_vgg_batch_norm_after_every_conv():
    model = vgg(16)
    kinds = [type(m) for m in model]
    convs = [i for i, k in enumerate(kinds) if k is nn.Conv2d]
    assert len(convs) == 13
    assert all(kinds[i + 1] is nn.BatchNorm2d and kinds[i + 2] is nn.ReLU for i in convs)


def test_resnet_shortcut_subsamples_and_zero_pads():
    block = resnet(20).blocks[3]  # first block of stage 2: 16 → 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    short = block.shortcut(x)
    assert short.shape == (2, 32, 4, 4)
    torch.testing.assert_close(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0


def test_bad_names_and_depths():
    with pytest.raises(ValueError, match="unknown model 'resnet18'.*resnet20"):
        build_model("resnet18", 3, 10, 32)
    with pytest.raises(ValueError, match="6n\\+2.*got 21"):
        resnet(21)
    with pytest.raises(ValueError, match="depth must be one of"):
        vgg(13)


def test_kfac_preconditions_every_conv_and_linear_of_resnet20():
    model = build_model("resnet20", 3, 10, 8)
    pre, opt = natgrad.build("kfac", model, lr=0.01)
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(pre.layers) == sorted(expected) and len(expected) == 20
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _imagenet_resnet_count(depth: int, classes: int) -> int:
    """Closed form of He et al. 2016, Table 1, with projection shortcuts (option B)."""
    total = _conv(3, 64, 7, False) + _bn(64)
    c_in, bottleneck = 64, depth == 50
    for planes, count in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        c_out = planes * (4 if bottleneck else 1)
        for i in range(count):
            if bottleneck:
                total += _conv(c_in, planes, 1, False) + _bn(planes)
                total += _conv(planes, planes, 3, False) + _bn(planes)
                total += _conv(planes, c_out, 1, False) + _bn(c_out)
            else:
                total += _conv(c_in, planes, 3, False) + _bn(planes)
                total += _conv(planes, planes, 3, False) + _bn(planes)
            if c_in != c_out or (i == 0 and planes != 64):
                total += _conv(c_in, c_out, 1, False) + _bn(c_out)
            c_in = c_out
    return total + c_in * classes + classes


@pytest.mark.parametrize("depth, published", [(34, 21_797_672), (50, 25_557_032)])
def test_imagenet_resnet_parameter_counts(depth, published):
    model = build_model(f"resnet{depth}", 3, 1000, 224)
    assert count_parameters(model) == published == _imagenet_resnet_count(depth, 1000)
    assert count_parameters(build_model(f"resnet{depth}", 3, 10, 32)) == (
        _imagenet_resnet_count(depth, 10)
    )


@pytest.mark.parametrize("depth, width", [(34, 512), (50, 2048)])
def test_imagenet_resnet_stem_stages_and_shapes(depth, width):
    model = build_model(f"resnet{depth}", 3, 1000, 224)
    assert (model.conv.kernel_size, model.conv.stride) == ((7, 7), (2, 2))
    assert isinstance(model.pool, nn.MaxPool2d)
    assert [len(s) for s in model.stages] == [3, 4, 6, 3]
    feats = model.stages(model.pool(model.bn(model.conv(torch.randn(1, 3, 224, 224)))))
    assert feats.shape == (1, width, 7, 7)  # stride 32 overall
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
