"""K-FAC's preconditioned gradient against explicit Kronecker products and dense solves."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_cnn
from reference import unvec, vec
from torch import nn

import natgrad

pytestmark = pytest.mark.usefixtures("float64")


def one_step(model, x, y, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.KFAC(model, opt, **kw)
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    pre.step()
    return pre, grads


def batch():
    torch.manual_seed(0)
    return torch.randn(7, 2, 8, 8), torch.randint(0, 4, (7,))


def test_factored_inverse_equals_dense_solve():
    x, y = batch()
    model = tiny_cnn()
    damping = 0.03
    pre, grads = one_step(model, x, y, damping=damping, kl_clip=None)
    for name, (A, G) in pre.factors().items():
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        A_d = A + pi * math.sqrt(damping) * torch.eye(A.shape[0])
        G_d = G + math.sqrt(damping) / pi * torch.eye(G.shape[0])
        ref = unvec(torch.linalg.solve(torch.kron(A_d, G_d), vec(grads[name])), grads[name].shape)
        torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-9, atol=1e-12)


def test_eigen_form_with_exact_damping_equals_damped_kronecker_inverse():
    x, y = batch()
    model = tiny_cnn()
    damping = 0.02
    pre, grads = one_step(model, x, y, damping=damping, kl_clip=None, inverse="eigen")
    for name, (A, G) in pre.factors().items():
        F_block = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0])
        ref = unvec(torch.linalg.solve(F_block, vec(grads[name])), grads[name].shape)
        torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-8, atol=1e-11)


def test_eigen_form_with_factored_damping_equals_inverse_form():
    from natgrad.curvature import KroneckerFactors
    from natgrad.inverses import EigenInverse, FactoredInverse

    torch.manual_seed(1)
    curv = KroneckerFactors((3, 5), torch.float64, torch.device("cpu"))
    curv.update(natgrad.LayerStats(torch.randn(6, 2, 5), torch.randn(6, 2, 3)), 0.0)
    V = torch.randn(3, 5)
    eig = EigenInverse(torch.float64, torch.device("cpu"), damping_mode="factored")
    inv = FactoredInverse(torch.float64, torch.device("cpu"))
    eig.refresh(curv, 0.1)
    inv.refresh(curv, 0.1)
    torch.testing.assert_close(eig.apply(V, 0.1), inv.apply(V, 0.1))


def test_kl_clip_scales_by_the_formula():
    x, y = batch()
    torch.manual_seed(5)
    model, clone = tiny_cnn(), tiny_cnn()
    clone.load_state_dict(model.state_dict())
    lr, kappa = 0.5, 1e-4
    unclipped, grads = one_step(clone, x, y, kl_clip=None)
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
    x, y = batch()
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


def test_precondition_leaves_grad_and_state_untouched():
    x, y = batch()
    model = tiny_cnn()
    pre, _ = one_step(model, x, y, kl_clip=None)
    before = {n: t.clone() for n, t in pre.grad_matrices().items()}
    state = pre.state_dict()
    V = {n: torch.randn_like(t) for n, t in before.items()}
    out = pre.precondition(V)
    for n in before:
        torch.testing.assert_close(pre.grad_matrices()[n], before[n], rtol=0, atol=0)
        assert not torch.equal(out[n], V[n])
    assert pre.state_dict()["steps"] == state["steps"]
    with pytest.raises(KeyError, match="not a preconditioned layer"):
        pre.precondition({"nope": torch.zeros(1)})


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
    x, y = batch()
    model = tiny_cnn()
    pre, _ = one_step(model, x, y, kl_clip=None, T_inv=100)
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


def test_kfac_defaults_construct_and_first_step_updates_everything():
    model = tiny_cnn()
    pre = natgrad.KFAC(model)
    assert isinstance(natgrad.METHODS["kfac"](model), natgrad.KFAC)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    pre.configure(kl_clip=None)
    pre.step()
    assert set(pre.factors()) == {"0", "3"}
    assert all(layer.inverse.ready for layer in pre.layers.values())


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


def test_persistent_clipping_is_reported_once(monkeypatch):
    monkeypatch.setattr("natgrad.clipping.CLIP_STREAK_WARNING", 4)
    x, y = batch()
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = natgrad.KFAC(model, opt, kl_clip=1e-8)
    import warnings

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
