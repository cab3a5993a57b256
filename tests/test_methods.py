"""What is particular to one method (``natgrad/methods/``): registry defaults, method
options and their errors, and end-to-end checks of a combination that the contract
suite (test_contract.py, every method) does not cover."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_batch, digit_batches, digits_cnn, tiny_cnn, train
from reference import unvec, vec

import natgrad
from natgrad.curvature import BatchMatrices, KroneckerFactors
from natgrad.inverses import ShermanMorrisonInverse

pytestmark = pytest.mark.usefixtures("float64", "one_thread")
CPU = torch.device("cpu")


# ---------------------------------------------------------------- K-FAC


def test_kfac_defaults_construct_and_first_step_updates_everything():
    model = tiny_cnn()
    pre = natgrad.KFAC(model)
    assert isinstance(natgrad.METHODS["kfac"](model), natgrad.KFAC)
    x, y = conv_batch()
    F.cross_entropy(model(x), y).backward()
    pre.configure(kl_clip=None)
    pre.step()
    assert set(pre.factors()) == {"0", "3"}
    assert all(layer.inverse.ready for layer in pre.layers.values())


# ---------------------------------------------------------------- SKFAC


@pytest.mark.parametrize("kw", [{}, {"reduction": "subsample", "spatial_samples": 2}])
def test_skfac_step_equals_the_dense_damped_kronecker_solve(kw):
    model = digits_cnn()
    (x, y), damping = digit_batches(1, size=12)[0], 0.05
    pre = natgrad.SKFAC(model, damping=damping, kl_clip=None, **kw)
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    pre.step()
    for name, (A, G) in pre.factors().items():
        A_d, G_d = A + damping * torch.eye(A.shape[0]), G + damping * torch.eye(G.shape[0])
        ref = unvec(torch.linalg.solve(torch.kron(A_d, G_d), vec(grads[name])), grads[name].shape)
        torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-8, atol=1e-11)


def test_skfac_registry_defaults_and_training():
    """Defaults; the run learns (resuming it: test_contract.py)."""
    model = digits_cnn()
    pre = natgrad.METHODS["skfac"](model)
    c = pre.config
    assert isinstance(pre, natgrad.SKFAC)
    assert (c.damping, c.T_cov, c.T_inv, c.reduction, c.spatial_samples, c.reading) == (
        1e-3,
        20,
        200,
        "reduce_sum",
        1,
        "algorithm2",
    )

    data = digit_batches(12)
    kw = dict(lr=0.05, T_cov=2, T_inv=5, damping=0.1, reduction="subsample", spatial_samples=3)
    model = digits_cnn()
    pre, opt = natgrad.build("skfac+sgd", model, **kw)
    losses = train(model, pre, opt, data)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns


def test_skfac_short_last_batch_keeps_training():
    model = digits_cnn()
    pre, opt = natgrad.build("skfac+sgd", model, lr=0.05, T_cov=1, T_inv=1, damping=0.1)
    data = (
        digit_batches(3, size=16)
        + digit_batches(1, size=5, seed=9)
        + digit_batches(1, size=16, seed=3)
    )
    losses = train(model, pre, opt, data)
    assert all(math.isfinite(v) for v in losses)
    assert pre.layers["3"].curvature.rows == 16


def test_skfac_bad_arguments_name_the_argument():
    model = digits_cnn()
    with pytest.raises(ValueError, match="spatial_samples must be an integer >= 1, got 0"):
        natgrad.SKFAC(model, spatial_samples=0)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'mean'"):
        natgrad.SKFAC(model, reduction="mean")
    with pytest.raises(ValueError, match=r"samples \(s'\) must be an integer >= 1, got -2"):
        BatchMatrices((2, 3), torch.float64, CPU, samples=-2)
    pre = natgrad.SKFAC(model)
    with pytest.raises(ValueError, match="spatial_samples must be an integer >= 1, got 1.5"):
        pre.configure(spatial_samples=1.5)
    pre.configure(reduction="subsample", spatial_samples=4)
    assert all(layer.curvature.samples == 4 for layer in pre.layers.values())


# ---------------------------------------------------------------- SM-K-FAC


@pytest.mark.parametrize("reading", ["paper", "chained"])
def test_smkfac_switches_after_its_full_updates_and_steps_with_the_dense_inverses(reading):
    """Through the method: ``k + 1`` (paper) or ``k`` (chained) full inverses, the switch to
    diagonal accumulation right after them, then every step with the dense inverse of the
    matrix the reading names (docs/math.md §8)."""
    model = digits_cnn()
    k, alpha, damping = 2, 0.2, 0.03
    full_inverses = k + 1 if reading == "paper" else k
    pre = natgrad.SMKFAC(
        model, k=k, alpha=alpha, beta=alpha, damping=damping, T_cov=1, T_inv=2, kl_clip=None,
        reading=reading,
    )
    reference = {}
    for name, layer in pre.layers.items():  # a full K-FAC fed the same rows, alongside
        full = reference[name] = KroneckerFactors(layer.curvature.shape, torch.float64, CPU)
        original = layer.curvature.update

        def update(stats, decay, original=original, full=full):
            original(stats, decay)
            full.update(stats, decay)

        layer.curvature.update = update
    X, base = {}, {}
    for step, (x, y) in enumerate(digit_batches(9, size=16)):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = pre.grad_matrices()
        pre.step()
        refreshes = step // 2 + 1
        for name, layer in pre.layers.items():
            A, G = reference[name].factors()
            if step % 2 == 0 and refreshes <= full_inverses:
                pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
                X[name] = base[name] = (
                    A + pi * math.sqrt(damping) * torch.eye(A.shape[0]),
                    G + math.sqrt(damping) / pi * torch.eye(G.shape[0]),
                )
            elif step % 2 == 0:
                u, v = A.diagonal().sqrt(), G.diagonal().sqrt()
                start = base[name] if reading == "paper" else X[name]
                X[name] = (
                    start[0] + alpha * torch.outer(u, u),
                    start[1] + alpha * torch.outer(v, v),
                )
            assert layer.curvature.diagonal_only == (refreshes >= full_inverses)
            X_A, X_G = X[name]
            ref = torch.linalg.solve(X_G, grads[name]) @ torch.linalg.inv(X_A)
            torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-8, atol=1e-11)
    assert set(pre.factors()) == set(pre.layers)


def test_smkfac_registry_defaults_and_training_across_the_switch():
    """Defaults; the run learns and reaches the rank-one phase (resuming it across the
    switch: test_contract.py)."""
    model = digits_cnn()
    pre = natgrad.METHODS["smkfac"](model)
    c = pre.config
    assert isinstance(pre, natgrad.SMKFAC)
    assert (c.k, c.alpha, c.beta, c.T_cov, c.T_inv, c.damping) == (10, 0.1, 0.1, 10, 100, 1e-3)
    assert c.reading == "paper"

    data = digit_batches(14)
    kw = dict(lr=0.05, T_cov=2, T_inv=3, k=2, damping=0.01)
    model = digits_cnn()
    pre, opt = natgrad.build("smkfac+sgd", model, **kw)
    losses = train(model, pre, opt, data)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(layer.inverse.rank_one_updates > 0 for layer in pre.layers.values())


def test_smkfac_bad_arguments_name_the_argument():
    model = digits_cnn()
    with pytest.raises(ValueError, match="k must be an integer >= 0, got -1"):
        natgrad.SMKFAC(model, k=-1)
    with pytest.raises(ValueError, match="k must be an integer >= 0, got 1.5"):
        natgrad.SMKFAC(model, k=1.5)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got 0"):
        natgrad.SMKFAC(model, alpha=0)
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got -0.1"):
        natgrad.SMKFAC(model, beta=-0.1)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got inf"):
        ShermanMorrisonInverse(torch.float64, CPU, alpha=float("inf"))
    with pytest.raises(ValueError, match="reading must be one of.*got 'text'"):
        natgrad.SMKFAC(model, reading="text")
    pre = natgrad.SMKFAC(model, reading="chained")
    pre.configure(alpha=0.5, k=0)  # chained with k = 0: switched at once
    assert all(layer.inverse.alpha == 0.5 for layer in pre.layers.values())
    assert all(layer.curvature.diagonal_only for layer in pre.layers.values())
    pre = natgrad.SMKFAC(model, k=0)  # the paper's reading: one full inverse first
    assert not any(layer.curvature.diagonal_only for layer in pre.layers.values())
    assert all(layer.inverse.full_inverses == 1 for layer in pre.layers.values())
