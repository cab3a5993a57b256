"""The preconditioner's wiring: the factor and inverse schedules, ``configure``, the
factors' dtype for low-precision models, and Monte-Carlo Fisher sampling."""


import pytest
import torch
import torch.nn.functional as F
from helpers import conv_batch, one_step, tiny_cnn
from torch import nn

import natgrad

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def test_schedules_refresh_stale_inverses_and_factors():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre = natgrad.KFAC(model, opt, T_cov=2, T_inv=3, decay=0.5)
    seen_A, seen_inv = [], []
    for _ in range(7):
        opt.zero_grad()
        x = torch.randn(5, 4)
        F.cross_entropy(model(x), torch.randint(0, 3, (5,))).backward()
        pre.step()
        opt.step()
        seen_A.append(pre.factors()["0"][0].clone())
        seen_inv.append(pre.layers["0"].inverse.A_inv.clone())
    changed_A = [i for i in range(1, 7) if not torch.equal(seen_A[i], seen_A[i - 1])]
    changed_inv = [i for i in range(1, 7) if not torch.equal(seen_inv[i], seen_inv[i - 1])]
    assert changed_A == [2, 4, 6]
    assert changed_inv == [3, 6]


def test_configure_validates_and_refreshes_on_new_damping():
    x, y = conv_batch()
    model = tiny_cnn()
    pre, _ = one_step(natgrad.KFAC, model, x, y, kl_clip=None, T_inv=100)
    old = pre.layers["3"].inverse.A_inv.clone()
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        pre.configure(damping=-1.0)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        pre.configure(dampnig=1.0)
    pre.configure(damping=1.0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()  # step 1: not a T_inv step, but the damping changed
    assert not torch.equal(pre.layers["3"].inverse.A_inv, old)
    assert pre.config.damping == 1.0
    with pytest.raises(ValueError, match="inverse is fixed when the preconditioner is built"):
        pre.configure(inverse="eigen")
    assert pre.config.inverse == "factored"
    pre.configure(inverse="factored", T_cov=5)  # unchanged: allowed with other changes
    assert pre.config.T_cov == 5


def test_factors_stay_float32_for_low_precision_models():
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16)
    pre = natgrad.KFAC(model, kl_clip=None)
    x = torch.randn(6, 4, dtype=torch.bfloat16)
    F.cross_entropy(model(x).float(), torch.randint(0, 3, (6,))).backward()
    pre.step()
    A, G = pre.factors()["0"]
    assert A.dtype == torch.float32 and G.dtype == torch.float32
    assert model[0].weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(model[0].weight.grad.float()).all()


# ---------------------------------------------------------------- Monte-Carlo Fisher


def test_monte_carlo_fisher_uses_sampled_labels():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    pre = natgrad.KFAC(model, fisher="mc", kl_clip=None, seed=11)
    out = model(x)
    pre.sample_fisher(out)
    assert all(p.grad is None for p in model.parameters())  # sampling leaves .grad alone
    F.cross_entropy(out, y).backward()
    pre.step()
    # Reference: the same sampled labels, per-sample output gradients of the last layer.
    probs = F.softmax(out.detach().float(), dim=-1)
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(11)).squeeze(-1)
    g = F.softmax(out.detach(), -1) - F.one_hot(sampled, 3)
    G_ref = g.T @ g / 9
    torch.testing.assert_close(pre.factors()["2"][1], G_ref)
    # And it differs from the empirical Fisher with the true labels.
    g_emp = F.softmax(out.detach(), -1) - F.one_hot(y, 3)
    assert not torch.allclose(G_ref, g_emp.T @ g_emp / 9)
