"""Bad input gets a clear error; numerical faults never corrupt parameters or state."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad import linalg


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, torch.randn(8, 4), torch.randint(0, 3, (8,))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"damping": 0.0}, "damping must be a finite number > 0, got 0.0"),
        ({"damping": -1e-3}, "damping must be a finite number > 0"),
        ({"damping": float("nan")}, "damping must be a finite number > 0"),
        ({"decay": 1.0}, r"decay must be in \[0, 1\), got 1.0"),
        ({"decay": -0.1}, r"decay must be in \[0, 1\)"),
        ({"T_cov": 0}, "T_cov must be an integer >= 1, got 0"),
        ({"T_inv": -5}, "T_inv must be an integer >= 1"),
        ({"T_inv": 2.5}, "T_inv must be an integer >= 1"),
        ({"kl_clip": 0}, "kl_clip must be a finite number > 0"),
        ({"inverse": "svd"}, "inverse must be 'factored' or 'eigen'"),
        ({"fisher": "true"}, "fisher must be 'empirical' or 'mc'"),
        ({"loss_reduction": "none"}, "loss_reduction must be 'mean' or 'sum'"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_arguments_name_the_argument(kw, match):
    model, _, _ = model_and_batch()
    with pytest.raises((ValueError, TypeError), match=match):
        natgrad.KFAC(model, **kw)


def test_model_without_supported_layers():
    with pytest.raises(ValueError, match="no layer KFAC can precondition"):
        natgrad.KFAC(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        natgrad.KFAC("not a model")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        natgrad.KFAC(nn.Linear(2, 2), optimizer=object())


def test_step_without_gradients_or_learning_rate():
    model, x, y = model_and_batch()
    pre = natgrad.KFAC(model)
    with pytest.raises(RuntimeError, match="call loss.backward"):
        pre.step()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="attach"):
        pre.step()
    pre.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    pre.step()


def run_steps(model, pre, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()


def test_nan_batch_keeps_previous_factors_and_finite_parameters():
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.KFAC(model, opt, T_cov=1, T_inv=1)
    run_steps(model, pre, opt, x, y, 2)
    before = {n: (A.clone(), G.clone()) for n, (A, G) in pre.factors().items()}
    opt.zero_grad()
    bad = x.clone()
    bad[0, 0] = float("nan")
    out = model(bad)
    F.cross_entropy(out, y).backward()
    # The outer layer's gradient is NaN too; zero the parameters' NaN grads as a user's
    # gradient sanitiser would, so only the statistics carry the fault.
    for p in model.parameters():
        p.grad = torch.nan_to_num(p.grad, nan=0.0)
    with pytest.warns(natgrad.NumericalWarning, match="non-finite statistics"):
        pre.step()
    opt.step()
    for name, (A, G) in pre.factors().items():
        assert torch.equal(A, before[name][0]) and torch.equal(G, before[name][1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for t in _tensors(pre.state_dict()))
    run_steps(model, pre, opt, x, y, 2)  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def test_nan_factor_falls_back_to_previous_inverse():
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.KFAC(model, opt, T_cov=1, T_inv=1)
    run_steps(model, pre, opt, x, y, 1)
    previous = pre.layers["0"].inverse.A_inv.clone()
    pre.layers["0"].curvature.A[0, 0] = float("inf")  # a corrupted running factor
    pre.configure(T_cov=100)  # keep it from being overwritten before the refresh
    with pytest.warns(natgrad.NumericalWarning, match="using the previous inverse"):
        run_steps(model, pre, opt, x, y, 1)
    assert torch.equal(pre.layers["0"].inverse.A_inv, previous)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_decomposition_retries_with_more_damping(monkeypatch):
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.KFAC(model, opt, damping=1e-3)
    real = linalg.damped_inverse
    shifts = []

    def flaky(X, shift):
        shifts.append(shift)
        if shift < 0.05:  # pretend small shifts fail, as for an ill-conditioned factor
            raise linalg.DecompositionError("injected failure")
        return real(X, shift)

    monkeypatch.setattr("natgrad.inverses.factored.damped_inverse", flaky)
    with pytest.warns(natgrad.NumericalWarning, match="succeeded with"):
        run_steps(model, pre, opt, x, y, 1)
    assert all(layer.inverse.ready for layer in pre.layers.values())
    assert max(shifts) >= 0.05


def test_failed_decomposition_without_previous_inverse_uses_plain_gradient(monkeypatch):
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.KFAC(model, opt, kl_clip=None)

    def broken(X, shift):
        raise linalg.DecompositionError("injected failure")

    monkeypatch.setattr("natgrad.inverses.factored.damped_inverse", broken)
    F.cross_entropy(model(x), y).backward()
    plain = {n: g.clone() for n, g in pre.grad_matrices().items()}
    with pytest.warns(natgrad.NumericalWarning, match="plain gradient"):
        pre.step()
    for n, g in pre.grad_matrices().items():
        assert torch.equal(g, plain[n])


@pytest.mark.parametrize("method", ["ekfac", "kfac-eigen"])
def test_failed_eigendecomposition_is_not_retried_with_more_damping(monkeypatch, method):
    """The eigen forms decompose the undamped factors: more damping cannot help."""
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = (natgrad.EKFAC(model, opt) if method == "ekfac"
           else natgrad.KFAC(model, opt, inverse="eigen"))
    calls = []

    def broken(X):
        calls.append(X.shape)
        raise linalg.DecompositionError("injected failure")

    monkeypatch.setattr("natgrad.linalg.symmetric_eigh", broken)
    with pytest.warns(natgrad.NumericalWarning, match=r"inverse update failed \(injected"):
        run_steps(model, pre, opt, x, y, 1)
    assert len(calls) == len(pre.layers)  # one attempt per layer, no retries
    assert not any(layer.inverse.ready for layer in pre.layers.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_eigh_failure_is_a_decomposition_error(monkeypatch):
    def fail(X):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    with pytest.raises(linalg.DecompositionError, match="did not converge"):
        linalg.symmetric_eigh(torch.eye(3))


def test_non_finite_delta_falls_back_to_gradient():
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.KFAC(model, opt, kl_clip=None)
    run_steps(model, pre, opt, x, y, 1)
    pre.layers["2"].inverse.G_inv[0, 0] = math.inf
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = pre.grad_matrices()["2"].clone()
    with pytest.warns(natgrad.NumericalWarning, match="not finite"):
        pre.step()
    assert torch.equal(pre.grad_matrices()["2"], plain)
