"""The local quadratic model: exact curvature–vector products against dense Gauss–Newton
matrices, the step-size formula against its closed form, targets read back from gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from natgrad.quadratic import (
    ModelTap,
    negative_log_likelihood,
    output_hessian_form,
    output_jvp,
    quadratic_step,
    recover_targets,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _flat(model, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = vec[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _dense_ggn(model, x, likelihood):
    """``C = (1/M) Σ_i J_iᵀ H_i J_i`` from the full Jacobian (torch.func.jacrev)."""
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(vec):
        return functional_call(model, _flat(model, vec), (x,))

    J = jacrev(f)(theta)  # (M, C, n)
    z = f(theta)
    M = x.shape[0]
    C = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(M):
        if likelihood == "categorical":
            p = torch.softmax(z[i], 0)
            H = torch.diag(p) - torch.outer(p, p)
        else:
            H = torch.eye(z.shape[1], dtype=torch.float64)
        C += J[i].T @ H @ J[i]
    assert names
    return C / M, z


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_curvature_vector_products_equal_dense_ggn(likelihood):
    model = _mlp()
    x = torch.randn(7, 5, dtype=torch.float64)
    C, z = _dense_ggn(model, x, likelihood)
    n = C.shape[0]
    g = torch.Generator().manual_seed(1)
    v, w = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g,
                                                                          dtype=torch.float64)
    out, Jv = output_jvp(model, (x,), {}, _flat(model, v))
    _, Jw = output_jvp(model, (x,), {}, _flat(model, w))
    assert torch.allclose(out, z, atol=1e-14)
    got = output_hessian_form(out, Jv, Jw, likelihood)
    assert got == pytest.approx((v @ C @ w).item(), rel=1e-12, abs=1e-14)
    assert output_hessian_form(out, Jv, Jv, likelihood) == pytest.approx(
        (v @ C @ v).item(), rel=1e-12
    )


def test_jvp_at_other_parameters_and_buffers_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    running = model[1].running_mean.clone()
    other = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out, jv = output_jvp(model, (x,), {}, tangents, params=other)
    assert torch.equal(model[1].running_mean, running)
    # Finite-difference check of J v at the other parameters (central, float64).
    eps = 1e-6
    plus = {n: other[n] + eps * tangents[n] for n in other}
    minus = {n: other[n] - eps * tangents[n] for n in other}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    f_plus = functional_call(model, {**plus, **buffers}, (x,))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    f_minus = functional_call(model, {**minus, **buffers}, (x,))
    assert torch.allclose(jv, (f_plus - f_minus) / (2 * eps), atol=1e-7)


def test_alpha_star_equals_closed_form_on_dense_quadratic():
    g = torch.Generator().manual_seed(0)
    n = 12
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    C = B @ B.T
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    d = -torch.linalg.solve(C + 0.3 * torch.eye(n, dtype=torch.float64), grad)
    lam = 0.05
    (alpha,) = quadratic_step(((grad @ d).item(),), (((d @ C @ d + lam * d @ d).item(),),))
    closed = -(grad @ d) / (d @ C @ d + lam * d @ d)
    assert abs(alpha - closed.item()) < 1e-10
    # α* minimises M(αd) = α gᵀd + ½α² dᵀ(C+λI)d: the derivative vanishes there.
    slope = grad @ d + alpha * (d @ C @ d + lam * d @ d)
    assert abs(slope.item()) < 1e-10


def test_two_direction_step_solves_the_2x2_system():
    g = torch.Generator().manual_seed(3)
    n = 9
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    C = B @ B.T + torch.eye(n, dtype=torch.float64)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    d, m = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g,
                                                                         dtype=torch.float64)
    K = ((d @ C @ d).item(), (d @ C @ m).item()), ((m @ C @ d).item(), (m @ C @ m).item())
    alpha, mu = quadratic_step(((grad @ d).item(), (grad @ m).item()), K)
    D = torch.stack([d, m], 1)
    exact = -torch.linalg.solve(D.T @ C @ D, D.T @ grad)
    assert abs(alpha - exact[0].item()) < 1e-10 and abs(mu - exact[1].item()) < 1e-10
    # Not positive definite: no step.
    assert quadratic_step((1.0, 1.0), ((1.0, 2.0), (2.0, 1.0))) == (0.0, 0.0)
    assert quadratic_step((1.0,), ((-1.0,),)) == (0.0,)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_targets_read_back_from_the_output_gradient(likelihood, reduction):
    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    if likelihood == "categorical":
        y = torch.randint(0, 4, (6,))
        loss = F.cross_entropy(z, y, reduction=reduction, label_smoothing=0.1)
        soft = F.one_hot(y, 4).double() * 0.9 + 0.1 / 4
    else:
        soft = torch.randn(6, 4, dtype=torch.float64)
        loss = 0.5 * ((z - soft) ** 2).sum(1)
        loss = loss.mean() if reduction == "mean" else loss.sum()
    (grad,) = torch.autograd.grad(loss, z)
    got = recover_targets(z.detach(), grad, likelihood, reduction)
    assert torch.allclose(got, soft, atol=1e-12)
    assert negative_log_likelihood(z.detach(), got, likelihood, reduction) == pytest.approx(
        loss.item(), rel=1e-12
    )


def test_targets_refused_when_the_loss_is_not_cross_entropy():
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((z ** 2).sum() * 10, z)
    assert recover_targets(z.detach(), grad, "categorical") is None


def test_tap_records_training_passes_only():
    model = _mlp()
    tap = ModelTap(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    model(x).sum().backward()
    assert tap.recorded() is None  # not armed
    tap.armed = True
    with torch.no_grad():
        model(x)
    assert tap.recorded() is None
    out = model(x)
    assert tap.recorded() is None  # no backward yet
    out = model(x)
    out.pow(2).sum().backward()
    record = tap.recorded()
    assert record.args[0] is x and torch.allclose(record.output_grad, 2 * out.detach())
    part = tap.recorded(samples=3)
    assert torch.equal(part.args[0], x[:3]) and part.batch == 4
    assert torch.equal(part.output_grad, record.output_grad[:3])
    tap.clear()
    assert tap.recorded() is None
    tap.remove()
    model(x).sum().backward()
    assert tap.recorded() is None
