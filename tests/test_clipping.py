"""KL clipping: the scale ``ν`` against its formula, per parameter group learning rates,
and the warning when clipping persists."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_batch, one_step, tiny_cnn

import natgrad

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def test_kl_clip_scales_by_the_formula():
    x, y = conv_batch()
    torch.manual_seed(5)
    model, clone = tiny_cnn(), tiny_cnn()
    clone.load_state_dict(model.state_dict())
    lr, kappa = 0.5, 1e-4
    unclipped, grads = one_step(natgrad.KFAC, clone, x, y, kl_clip=None)
    ref = unclipped.grad_matrices()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pre = natgrad.KFAC(model, opt, kl_clip=kappa)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    vdotg = sum(torch.sum(ref[n] * grads[n]).item() for n in ref)
    nu = min(1.0, math.sqrt(kappa / (lr**2 * vdotg)))
    assert nu < 1.0  # the bound is active in this set-up
    for name, delta in pre.grad_matrices().items():
        torch.testing.assert_close(delta, nu * ref[name], rtol=1e-10, atol=1e-14)


def test_kl_clip_reads_each_param_groups_learning_rate():
    x, y = conv_batch()
    model = tiny_cnn()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[3].parameters()}], lr=1.0
    )
    pre = natgrad.KFAC(model, opt, kl_clip=1e-6)
    F.cross_entropy(model(x), y).backward()
    pre.step()  # step 0 computes the inverses
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = pre.grad_matrices()
    deltas = pre.precondition(g)
    pre.step()
    vdotg = torch.sum(deltas["3"] * g["3"]).item()  # only layers with lr > 0 count
    nu = math.sqrt(1e-6 / vdotg)
    assert nu < 1.0
    torch.testing.assert_close(pre.grad_matrices()["0"], nu * deltas["0"])


def test_persistent_clipping_is_reported_once(monkeypatch):
    monkeypatch.setattr("natgrad.clipping.CLIP_STREAK_WARNING", 4)
    x, y = conv_batch()
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = natgrad.KFAC(model, opt, kl_clip=1e-8)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()
    clip = [w for w in caught if issubclass(w.category, natgrad.ClippingWarning)]
    assert len(clip) == 1 and "no longer depends on the learning rate" in str(clip[0].message)
    assert 0 < pre.kl_scale < 1
