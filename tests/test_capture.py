"""Captured rows and K-FAC factors against MATH.md's formulas computed by hand."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import patches_by_loops, per_sample_grad_matrices, per_sample_output_grads
from torch import nn

import natgrad
from natgrad.capture import LayerCapture
from natgrad.layers import handler_for

pytestmark = pytest.mark.usefixtures("float64")


def capture_rows(model, layer_name, x, y):
    layer = dict(model.named_modules())[layer_name]
    cap = LayerCapture({layer_name: (layer, handler_for(layer))}, "mean")
    F.cross_entropy(model(x), y).backward()
    stats = cap.pop()[layer_name]
    cap.remove()
    model.zero_grad()
    return stats


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_match_formula(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    pre = natgrad.KFAC(model, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    for idx, name in enumerate(["0", "2"]):
        layer = model[2 * idx]
        inputs = x if idx == 0 else torch.tanh(model[0](x))
        a = torch.cat([inputs, torch.ones(6, 1)], 1) if bias else inputs
        g = per_sample_output_grads(model, layer, x, y)[:, 0, :]
        A_ref = sum(torch.outer(a[i], a[i]) for i in range(6)) / 6
        G_ref = sum(torch.outer(g[i], g[i]) for i in range(6)) / 6
        A, G = pre.factors()[name]
        torch.testing.assert_close(A, A_ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)


CONV_CASES = list(itertools.product([(3, 3), (2, 3)], [1, 2], [0, 1], [1, 2], [True, False]))


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", CONV_CASES)
def test_conv_factors_match_formula(kernel, stride, padding, dilation, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(4))
    x, y = torch.randn(3, 2, 8, 7), torch.randint(0, 4, (3,))
    model(x)  # materialise the lazy layer
    pre = natgrad.KFAC(model, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    a = patches_by_loops(x, conv)  # (M, T, d_in')
    g = per_sample_output_grads(model, conv, x, y)  # (M, T, c_out)
    m, t = a.shape[:2]
    A_ref = torch.einsum("mti,mtj->ij", a, a) / m
    G_ref = torch.einsum("mti,mtj->ij", g, g) / (m * t)
    A, G = pre.factors()["0"]
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-13)
    # The captured rows reproduce torch.func's per-sample gradients: ∇W̄_i = Σ_t g ā ᵀ.
    rows = capture_rows(model, "0", x, y)
    per_sample = per_sample_grad_matrices(model, "0", x, y)
    torch.testing.assert_close(
        torch.einsum("mto,mti->moi", rows.g, rows.a) / m, per_sample / m, rtol=1e-10, atol=1e-12
    )


def test_sequence_linear_is_a_conv_over_positions():
    """(M, T, d) inputs: rows are positions, A sums over them, G averages (KFC convention)."""
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    x, target = torch.randn(5, 6, 4), torch.randn(5, 6, 3)
    pre = natgrad.KFAC(lin, kl_clip=None)
    F.mse_loss(lin(x), target, reduction="sum").div(5).backward()
    pre.step()
    a = torch.cat([x, torch.ones(5, 6, 1)], -1)
    g = (2 * (lin(x) - target)).detach()  # ∂ℓ_i/∂s for ℓ_i = Σ_t ‖s − target‖²
    A_ref = torch.einsum("mti,mtj->ij", a, a) / 5
    G_ref = torch.einsum("mti,mtj->ij", g, g) / 30
    A, G = pre.factors()[""]
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(G, G_ref)


def test_sum_reduction_uses_gradients_as_they_are():
    torch.manual_seed(3)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pre_mean = natgrad.KFAC(lin, kl_clip=None)
    F.cross_entropy(lin(x), y).backward()
    pre_mean.step()
    G_mean = pre_mean.factors()[""][1]
    pre_mean.remove()
    lin.zero_grad()
    pre_sum = natgrad.KFAC(lin, kl_clip=None, loss_reduction="sum")
    F.cross_entropy(lin(x), y, reduction="sum").backward()
    pre_sum.step()
    torch.testing.assert_close(pre_sum.factors()[""][1], G_mean)


def test_unsupported_and_excluded_layers_are_left_alone():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.Linear(8, 3),
    )
    with pytest.warns(natgrad.UnsupportedLayerWarning, match="groups=2"):
        pre = natgrad.KFAC(model, exclude=["4"])
    assert list(pre.layers) == ["3"]
    assert "0" in pre.skipped and "groups=2" in repr(pre)
    assert "3: Linear" in repr(pre)


def test_exclude_by_type_and_pattern():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    )
    assert list(natgrad.KFAC(model, exclude=["2.*"]).layers) == ["0"]
    assert list(
        natgrad.KFAC(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), exclude=[nn.Linear]
        ).layers
    ) == ["0"]
    with pytest.raises(TypeError, match="exclude"):
        natgrad.KFAC(model, exclude=[3])


def test_other_modules_untouched_and_no_capture_off_schedule():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.KFAC(model, opt, T_cov=2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    F.cross_entropy(model(x), y).backward()
    ln_grad = model[1].weight.grad.clone()
    pre.step()
    torch.testing.assert_close(model[1].weight.grad, ln_grad, rtol=0, atol=0)
    assert pre._capture.active is False  # step 1 updates nothing: no rows are kept
    F.cross_entropy(model(x), y).backward()
    assert all(not r for r in pre._capture._done.values())
