"""Adaptive damping (Levenberg–Marquardt), the quadratic-model step and warm start, in a
real preconditioner, against dense references (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import natgrad
from natgrad.adaptive import ReductionRatio, lm_update
from natgrad.quadratic import ModelTap


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _data(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model, vec):
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = vec[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _dense_ggn(model, x):
    """Dense GGN of the mean cross-entropy at ``model``'s parameters (on a hook-free twin)."""
    twin = _mlp()
    twin.load_state_dict(model.state_dict())
    model = twin
    theta = _flat_params(model)

    def f(vec):
        return functional_call(model, _unflat(model, vec), (x,))

    J = jacrev(f)(theta)
    z = f(theta)
    C = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):
        p = torch.softmax(z[i], 0)
        C += J[i].T @ (torch.diag(p) - torch.outer(p, p)) @ J[i]
    return C / x.shape[0]


def _layer_vector(model, pre, mats):
    """Flatten per-layer matrices ``[W, b]`` into the parameter order of ``model``."""
    parts = {}
    for name, mat in mats.items():
        module = pre.layers[name].module
        d_w = module.weight[0].numel()
        parts[id(module.weight)] = mat[:, :d_w].reshape(module.weight.shape)
        parts[id(module.bias)] = mat[:, d_w]
    return torch.cat([parts[id(p)].reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------- quadratic step
def test_quadratic_step_equals_dense_closed_form():
    """First step (no previous update): ``u = α* d`` with ``d = −Δ`` and
    ``α* = −∇hᵀd / (dᵀCd + λ‖d‖²)`` from the dense GGN, to 1e-10."""
    model = _mlp()
    x, y = _data()
    lam = 0.3
    pre = natgrad.KFAC(model, step_size="quadratic", curvature_samples=None, damping=lam,
                       kl_clip=None, T_cov=1, T_inv=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pre.attach(opt)
    C = _dense_ggn(model, x)
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    g = _layer_vector(model, pre, grads)
    pre.step()
    # Δ with the inverses this step used (T_inv = 1: refreshed on this step).
    deltas = pre.precondition(grads)
    d = -_layer_vector(model, pre, deltas)
    alpha = -(g @ d) / (d @ C @ d + lam * d @ d)
    written = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # The trust cap may only raise the model's damping; here it must not bind.
    assert pre.quadratic_model.rule.trust_factor == 1.0
    assert torch.allclose(-written, alpha * d, rtol=0, atol=1e-10)


def test_quadratic_step_with_momentum_solves_the_2x2_system():
    """Second step: ``u = α d + μ m`` with ``m`` the previous update and ``(α, μ)`` from
    the dense 2×2 system ``[dᵀ; mᵀ](C + λI)[d m] c = −[dᵀ; mᵀ]∇h``, to 1e-10."""
    model = _mlp()
    lam = 0.3
    pre = natgrad.KFAC(model, step_size="quadratic", curvature_samples=None, damping=lam,
                       kl_clip=None, T_cov=1, T_inv=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pre.attach(opt)
    x, y = _data(0)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    theta0 = _flat_params(model)
    opt.step()
    m = _flat_params(model) - theta0
    x, y = _data(1)
    opt.zero_grad()
    C = _dense_ggn(model, x)
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    g = _layer_vector(model, pre, grads)
    pre.step()
    d = -_layer_vector(model, pre, pre.precondition(grads))
    D = torch.stack([d, m], 1)
    K = D.T @ C @ D + lam * D.T @ D
    coeffs = -torch.linalg.solve(K, D.T @ g)
    assert pre.quadratic_model.rule.trust_factor == 1.0
    written = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(-written, D @ coeffs, rtol=0, atol=1e-10)


def test_quadratic_step_needs_plain_sgd():
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = natgrad.KFAC(model, opt, step_size="quadratic")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="SGD.*without momentum"):
        pre.step()


def test_quadratic_step_falls_back_to_kl_clip_when_loss_is_not_the_likelihood():
    model = _mlp()
    x, _ = _data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = natgrad.KFAC(model, opt, step_size="quadratic", kl_clip=1e-3)
    (model(x) ** 2).sum().backward()  # not a cross-entropy
    with pytest.warns(natgrad.NumericalWarning, match="quadratic"):
        pre.step()
    assert pre.kl_scale < 1.0


# ---------------------------------------------------------------------- Levenberg–Marquardt
def test_lm_rule():
    assert lm_update(1.0, 0.9, 0.5, 1e-3, 10.0) == 0.5
    assert lm_update(1.0, 0.1, 0.5, 1e-3, 10.0) == 2.0
    assert lm_update(1.0, 0.5, 0.5, 1e-3, 10.0) == 1.0
    assert lm_update(1.0, float("nan"), 0.5, 1e-3, 10.0) == 2.0
    assert lm_update(8.0, -1.0, 0.5, 1e-3, 10.0) == 10.0
    assert lm_update(1e-3, 1.0, 0.5, 1e-3, 10.0) == 1e-3


def test_reduction_ratio_equals_dense_formula():
    model = _mlp()
    x, y = _data()
    modules = {"0": model[0], "2": model[2]}
    tap = ModelTap(model)
    tap.armed = True
    ratio = ReductionRatio(tap, modules, "categorical", "mean")
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    theta = _flat_params(model)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    C = _dense_ggn(model, x)
    layer_grads = {
        n: torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], 1) for n, m in modules.items()
    }
    assert ratio.record(layer_grads)
    noise = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    step = -2.0 * g + 0.05 * noise  # a descent direction: the model predicts a decrease
    with torch.no_grad():
        for p, v in zip(model.parameters(), _unflat(model, step).values()):
            p.add_(v)
    lam = {"0": 0.2, "2": 0.05}
    weights = torch.cat([torch.full((p.numel(),), lam[n.split(".")[0]], dtype=torch.float64)
                         for n, p in model.named_parameters()])
    new_loss = F.cross_entropy(model(x), y).item()
    predicted = g @ step + 0.5 * (step @ C @ step + (weights * step) @ step)
    expected = (new_loss - loss.item()) / predicted.item()
    assert ratio.ratio(lam) == pytest.approx(expected, rel=1e-10)


def _linear_regression(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randn(32, 3, generator=g, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("lr, direction", [(0.05, "down"), (20.0, "up")])
def test_lm_damping_moves_the_right_way_on_a_quadratic(lr, direction):
    """Least squares is its own quadratic model (Gaussian likelihood, GGN = Hessian): a
    short step makes ``ρ ≥ 1`` (λ falls); a step past the minimum's far side makes the
    loss rise, ``ρ < 0`` (λ grows)."""
    model, x, y = _linear_regression()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pre = natgrad.KFAC(model, opt, lm_damping=True, T_lm=1, likelihood="gaussian",
                       damping=1.0, kl_clip=None, T_cov=1, T_inv=1)
    seen = []
    for _ in range(4):
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        pre.step()
        opt.step()
        seen.append(pre.damping_policy.damping)
    rhos_moved = seen[-1] < 1.0 if direction == "down" else seen[-1] > 1.0
    assert rhos_moved, seen
    last = pre.quadratic_model.ratio.last
    assert (last >= 1.0) if direction == "down" else (last < 0.25)


# ---------------------------------------------------------------------- warm start
def test_warm_start_refreshes_on_the_documented_steps():
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre = natgrad.KFAC(model, opt, T_cov=10, T_inv=20, warm_start=(3, 7))
    refreshed, updated = [], []
    block = next(iter(pre.layers.values()))
    refresh, update = block.inverse.refresh, block.curvature.update

    def on_refresh(*a, **k):
        refreshed.append(pre.steps)
        return refresh(*a, **k)

    def on_update(*a, **k):
        updated.append(pre.steps)
        return update(*a, **k)

    block.inverse.refresh, block.curvature.update = on_refresh, on_update
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    assert refreshed == [0, 3, 7, 20]
    assert updated == [0, 3, 7, 10, 20]


def test_warm_start_is_validated():
    with pytest.raises(ValueError, match="warm_start"):
        natgrad.KFAC(_mlp(), warm_start=(3, -1))
    assert natgrad.KFAC(_mlp(), warm_start=[5, 2]).config.warm_start == (2, 5)


# ---------------------------------------------------------------------- state
def _train(model, pre, opt, steps, seed):
    for i in range(steps):
        x, y = _data(seed + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_state_round_trip_with_adaptive_state_is_bit_exact(method):
    settings = dict(step_size="quadratic", lm_damping=True, T_lm=2, T_cov=2, T_inv=4,
                    warm_start=(1,), curvature_samples=8)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = natgrad.METHODS[method](model, opt, **settings)
    _train(model, pre, opt, 5, 0)  # step 4 recorded a ratio that is still pending
    assert pre.quadratic_model.ratio.pending
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(pre.state_dict()),
             copy.deepcopy(opt.state_dict()))
    _train(model, pre, opt, 6, 100)
    expected = _flat_params(model)

    model2 = _mlp(seed=5)
    opt2 = torch.optim.SGD(model2.parameters(), lr=1.0)
    pre2 = natgrad.METHODS[method](model2, opt2, **settings)
    model2.load_state_dict(saved[0])
    pre2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    _train(model2, pre2, opt2, 6, 100)
    assert torch.equal(_flat_params(model2), expected)
    assert pre2.damping_policy.damping == pre.damping_policy.damping


def test_adaptive_step_refused_under_data_parallelism():
    """Each worker would solve for its own (α, μ) on its own rows: refused, not diverged."""
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = natgrad.KFAC(model, opt, step_size="quadratic")
    pre.distributed = object()  # any sharing: the check looks only at its presence
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="data parallelism"):
        pre.step()


# ---------------------------------------------------------------------- ρ without a second pass
def _ratio_run(lr: float, exact: bool, perturb: bool = False):
    """Two steps of K-FAC with the quadratic step and LM damping (T_lm = 1) at ``lr``; the
    second step's ρ is of the first step's update. ``exact``: drop the solved terms so
    ``ρ`` takes the forward-mode path; ``perturb``: move a parameter off ``lr·u``."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pre = natgrad.KFAC(model, opt, step_size="quadratic", lm_damping=True, T_lm=1,
                       curvature_samples=None, kl_clip=None, T_cov=1, T_inv=1, damping=0.3)
    ratio = pre.quadratic_model.ratio
    for i in range(2):
        x, y = _data(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i == 1 and exact:
            ratio._pending.pop("terms")
        pre.step()
        opt.step()
        if i == 0 and perturb:
            with torch.no_grad():
                model[0].weight[0, 0] += 1e-3
    return ratio


@pytest.mark.parametrize("lr", [1.0, 0.4])
def test_ratio_from_solved_terms_equals_the_forward_mode_ratio(lr):
    """``δ = lr·u``: ``M(δ)`` from the step's own terms (no extra pass) equals the exact
    forward-mode ``M(δ)`` on the whole batch, to 1e-10 (float64, all samples)."""
    cheap, exact = _ratio_run(lr, exact=False), _ratio_run(lr, exact=True)
    assert not cheap.exact and exact.exact
    assert cheap.last == pytest.approx(exact.last, rel=1e-10, abs=0)


def test_ratio_falls_back_to_forward_mode_when_the_step_is_not_the_solved_one():
    perturbed = _ratio_run(1.0, exact=False, perturb=True)
    assert perturbed.exact
    reference = _ratio_run(1.0, exact=True, perturb=True)
    assert perturbed.last == pytest.approx(reference.last, rel=1e-12, abs=0)


def test_summed_loss_on_some_samples_scales_the_curvature_to_the_batch():
    """Under ``loss_reduction="sum"``, products on 8 of 32 samples estimate the batch's
    sum: with the batch made of 4 copies of its first 8 samples they are exact, so the step
    equals the one computed on all 32."""
    x, y = _data(0, n=8)
    x, y = x.repeat(4, 1), y.repeat(4)

    def first_update(samples):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        pre = natgrad.KFAC(model, opt, step_size="quadratic", curvature_samples=samples,
                           kl_clip=None, T_cov=1, T_inv=1, damping=0.3, loss_reduction="sum")
        F.cross_entropy(model(x), y, reduction="sum").backward()
        pre.step()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    assert torch.allclose(first_update(8), first_update(None), rtol=1e-10, atol=0)
