"""EKFAC against dense references: the re-scaling ``S`` from ``torch.func`` per-sample
gradients, the update as an explicit Kronecker-basis solve, the re-scaling's life cycle
across bases, and the per-sample second-moment helper."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_cnn
from reference import per_sample_grad_matrices, unvec, vec
from torch import nn

import natgrad
from natgrad.capture import LayerStats
from natgrad.curvature import KroneckerFactors
from natgrad.inverses import EigenCorrectedInverse
from natgrad.persample import basis_second_moment

pytestmark = pytest.mark.usefixtures("float64")

CONV_CASES = [  # (kernel, stride, padding, dilation, bias)
    (3, 2, 1, 1, True),
    (3, 1, 0, 1, False),
    (2, 2, 1, 1, True),
    (3, 1, 2, 2, True),
]


def tiny_mlp(bias=True):
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias))


def data(model):
    torch.manual_seed(3)
    m = 9
    x = torch.randn(m, 6) if isinstance(model[0], nn.Linear) else torch.randn(m, 2, 7, 7)
    return x, torch.randint(0, 4, (m,))


def one_step(model, x, y, **kw):
    pre = natgrad.EKFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), kl_clip=None, **kw)
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    pre.step()
    return pre, grads


def explicit_S(model, name, x, y, Q_A, Q_G):
    per_sample = per_sample_grad_matrices(model, name, x, y)  # (M, d_out, d_in')
    return torch.stack([(Q_G.T @ G_i @ Q_A) ** 2 for G_i in per_sample]).mean(0)


@pytest.mark.parametrize("bias", [True, False])
def test_S_equals_per_sample_second_moment_linear(bias):
    model = tiny_mlp(bias)
    x, y = data(model)
    pre, _ = one_step(model, x, y)
    for name, layer in pre.layers.items():
        inv = layer.inverse
        A, G = layer.curvature.factors()
        # the basis is the eigenbasis of the running factors
        for X, Q in ((A, inv.Q_A), (G, inv.Q_G)):
            D = Q.T @ X @ Q
            torch.testing.assert_close(D, torch.diag(torch.diagonal(D)), atol=1e-12, rtol=0)
            torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-12, rtol=0)
        ref = explicit_S(model, name, x, y, inv.Q_A, inv.Q_G)
        torch.testing.assert_close(inv.S, ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", CONV_CASES)
def test_S_equals_per_sample_second_moment_conv(case):
    model = tiny_cnn(*case)
    x, y = data(model)
    pre, _ = one_step(model, x, y)
    for name, layer in pre.layers.items():
        inv = layer.inverse
        ref = explicit_S(model, name, x, y, inv.Q_A, inv.Q_G)
        torch.testing.assert_close(inv.S, ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("model_fn", [tiny_mlp, tiny_cnn])
def test_update_equals_dense_kronecker_basis_solve(model_fn):
    model = model_fn()
    x, y = data(model)
    damping = 3e-3
    pre, grads = one_step(model, x, y, damping=damping)
    for name, layer in pre.layers.items():
        inv = layer.inverse
        K = torch.kron(inv.Q_A, inv.Q_G)
        dense = K @ torch.diag(1.0 / (vec(inv.S) + damping)) @ K.T
        ref = unvec(dense @ vec(grads[name]), grads[name].shape)
        torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(ref, grads[name])  # preconditioning did something


def test_rescaling_restarts_in_a_new_basis():
    torch.manual_seed(0)
    dev, dt = torch.device("cpu"), torch.float64
    curv = KroneckerFactors((3, 4), dt, dev)
    batches = [LayerStats(torch.randn(5, 2, 4), torch.randn(5, 2, 3)) for _ in range(4)]
    curv.update(batches[0], 0.0)
    inv = EigenCorrectedInverse(dt, dev, observe_every=10)
    inv.refresh(curv, 1e-3)
    alpha, _ = torch.linalg.eigh(curv.A)
    gamma, _ = torch.linalg.eigh(curv.G)
    # before any observation: K-FAC's own eigenvalues, the exact-damping eigen form
    torch.testing.assert_close(inv.S, gamma.outer(alpha.clamp_min(0)))
    moment = [basis_second_moment(b.a, b.g, inv.Q_A, inv.Q_G) for b in batches]
    inv.observe(batches[1], 0.9)  # first batch in this basis replaces the initialisation
    torch.testing.assert_close(inv.S, moment[1])
    inv.observe(batches[2], 0.9)  # then a running average
    torch.testing.assert_close(inv.S, 0.9 * moment[1] + 0.1 * moment[2])
    curv.update(batches[3], 0.5)
    inv.refresh(curv, 1e-3)  # a new basis: the average restarts
    assert inv.fresh_basis
    inv.observe(batches[3], 0.9)
    last = batches[3]
    torch.testing.assert_close(inv.S, basis_second_moment(last.a, last.g, inv.Q_A, inv.Q_G))


def test_schedule_T_s_and_basis_refresh():
    model = tiny_mlp()
    x, y = data(model)
    pre = natgrad.EKFAC(model, kl_clip=None, T_cov=1, T_inv=4, T_s=2)
    S_history = []
    for _ in range(6):
        model.zero_grad()
        F.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y).backward()
        pre.step()
        S_history.append(pre.layers["0"].inverse.S.clone())
    changed = [not torch.equal(a, b) for a, b in zip(S_history, S_history[1:])]
    # steps 1..5: S changes at steps 2 (T_s) and 4 (refresh + T_s), not at 1, 3, 5
    assert changed == [False, True, False, True, False]
    pre.configure(T_s=1)
    assert all(layer.inverse.observe_every == 1 for layer in pre.layers.values())
    with pytest.raises(ValueError, match="T_s must be an integer >= 1, got 0"):
        natgrad.EKFAC(model, T_s=0)


@pytest.mark.parametrize("shape", [(6, 1, 5, 3), (4, 2, 5, 3), (3, 50, 5, 3), (7, 4, 6, 2)])
def test_basis_second_moment_matches_einsum(shape):
    m, p, d_in, d_out = shape
    a, g = torch.randn(m, p, d_in), torch.randn(m, p, d_out)
    Q_A = torch.linalg.qr(torch.randn(d_in, d_in))[0]
    Q_G = torch.linalg.qr(torch.randn(d_out, d_out))[0]
    grads = torch.einsum("mpo,mpi->moi", g, a)
    ref = torch.einsum("ok,moi,ij->mkj", Q_G, grads, Q_A).square().mean(0)
    torch.testing.assert_close(basis_second_moment(a, g, Q_A, Q_G), ref)
    # chunked: one sample at a time gives the same
    torch.testing.assert_close(basis_second_moment(a, g, Q_A, Q_G, chunk_elements=1), ref)


def test_non_finite_batch_leaves_S_untouched():
    model = tiny_mlp()
    x, y = data(model)
    pre, _ = one_step(model, x, y, T_s=1)
    S = {n: layer.inverse.S.clone() for n, layer in pre.layers.items()}
    model.zero_grad()
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    F.cross_entropy(model(x_bad), y).backward()
    with pytest.warns(natgrad.NumericalWarning):
        pre.step()
    for n, layer in pre.layers.items():
        assert torch.equal(layer.inverse.S, S[n])


@pytest.mark.parametrize("model_fn", [tiny_mlp, tiny_cnn])
def test_batch_scale_rule_sets_S_to_the_last_mini_batch_estimate(model_fn):
    """Xu 2021, Algorithm 1, UpdateScale: ``s* ← E_D[((U_A ⊗ U_G)ᵀ ∇θ)²]`` of the current
    mini-batch — per-sample gradients from ``torch.func``, no average across batches."""
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = natgrad.EKFAC(model, opt, kl_clip=None, T_s=1, T_inv=100, decay=0.5)
    assert pre.config.scale_rule == "batch"  # the default: Xu 2021's rule
    assert all(layer.inverse.scale_rule == "batch" for layer in pre.layers.values())
    running = {}
    for step in range(3):
        x, y = data(model)
        x = x + 0.3 * step
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        twin = model_fn()  # the same weights without the preconditioner's hooks
        twin.load_state_dict(model.state_dict())
        for name, layer in pre.layers.items():
            inv = layer.inverse
            ref = explicit_S(twin, name, x, y, inv.Q_A, inv.Q_G)
            torch.testing.assert_close(inv.S, ref, rtol=1e-10, atol=1e-14)
            running[name] = ref if step == 0 else 0.5 * running[name] + 0.5 * ref
            if step > 0:  # the running rule would have given something else
                assert not torch.allclose(inv.S, running[name])
        opt.step()


def test_scale_rule_is_checked_and_reaches_the_inverses():
    with pytest.raises(ValueError, match="scale_rule must be one of.*'batch'.*got 'mean'"):
        EigenCorrectedInverse(torch.float64, torch.device("cpu"), scale_rule="mean")
    with pytest.raises(ValueError, match="scale_rule must be one of.*got 'mean'"):
        natgrad.EKFAC(tiny_mlp(), scale_rule="mean")
    pre = natgrad.EKFAC(tiny_mlp(), scale_rule="running")
    assert all(layer.inverse.scale_rule == "running" for layer in pre.layers.values())
    pre.configure(scale_rule="batch")
    assert all(layer.inverse.scale_rule == "batch" for layer in pre.layers.values())
    tekfac = natgrad.TEKFAC(tiny_mlp())  # Gao et al. 2020, eq. 3.6: a running average
    assert tekfac.config.scale_rule == "running"
    assert all(layer.inverse.scale_rule == "running" for layer in tekfac.layers.values())
