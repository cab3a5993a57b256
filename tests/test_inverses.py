"""Inverse strategies against dense references in float64: factored (K-FAC's π-split
damping), eigen (exact or factored damping), eigen-corrected (EKFAC's and TEKFAC's
re-scaling: its value, schedule, life cycle across bases and decays), Sherman–Morrison
rank-one updates (both readings) and Woodbury application."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ShapeRecorder,
    conv_batch,
    feed,
    one_step,
    random_batch,
    random_stats,
    tiny_cnn,
    tiny_mlp,
)
from reference import per_sample_grad_matrices, reference_rows, unvec, vec

import natgrad
from natgrad.capture import LayerStats
from natgrad.curvature import (
    BatchMatrices,
    DiagonalSwitchFactors,
    KroneckerFactors,
    TraceRestrictedFactors,
)
from natgrad.inverses import (
    EigenCorrectedInverse,
    EigenInverse,
    FactoredInverse,
    ShermanMorrisonInverse,
    WoodburyInverse,
)
from natgrad.inverses.sherman_morrison import sherman_morrison_update
from natgrad.inverses.woodbury import (
    woodbury_cholesky,
    woodbury_explicit,
    woodbury_left,
    woodbury_right,
)
from natgrad.linalg import DecompositionError
from natgrad.persample import basis_second_moment

pytestmark = pytest.mark.usefixtures("float64", "one_thread")
CPU = torch.device("cpu")


def curvature_from(Y_A, Y_G):
    curv = BatchMatrices((Y_G.shape[1], Y_A.shape[1]), torch.float64, CPU)
    curv.Y_A, curv.Y_G = Y_A, Y_G
    return curv


# ---------------------------------------------------------------- factored


def test_factored_inverse_equals_dense_solve():
    x, y = conv_batch()
    model = tiny_cnn()
    damping = 0.03
    pre, grads = one_step(natgrad.KFAC, model, x, y, damping=damping, kl_clip=None)
    for name, (A, G) in pre.factors().items():
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        A_d = A + pi * math.sqrt(damping) * torch.eye(A.shape[0])
        G_d = G + math.sqrt(damping) / pi * torch.eye(G.shape[0])
        ref = unvec(torch.linalg.solve(torch.kron(A_d, G_d), vec(grads[name])), grads[name].shape)
        torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-9, atol=1e-12)


def test_factored_inverse_is_not_what_skfac_applies():
    """SKFAC's damping is λ on each factor, not K-FAC's factored split (docs/math.md §7)."""
    torch.manual_seed(0)
    Y_A, Y_G = torch.randn(3, 6), torch.randn(3, 4)
    curv = curvature_from(Y_A, Y_G)
    wood, fact = WoodburyInverse(torch.float64, CPU), FactoredInverse(torch.float64, CPU)
    wood.refresh(curv, 0.01)
    fact.refresh(curv, 0.01)
    V = torch.randn(4, 6)
    assert not torch.allclose(wood.apply(V, 0.01), fact.apply(V, 0.01))


# ---------------------------------------------------------------- eigen


def test_eigen_form_with_exact_damping_equals_damped_kronecker_inverse():
    x, y = conv_batch()
    model = tiny_cnn()
    damping = 0.02
    pre, grads = one_step(natgrad.KFAC, model, x, y, damping=damping, kl_clip=None, inverse="eigen")
    for name, (A, G) in pre.factors().items():
        F_block = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0])
        ref = unvec(torch.linalg.solve(F_block, vec(grads[name])), grads[name].shape)
        torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-8, atol=1e-11)


def test_eigen_form_with_factored_damping_equals_inverse_form():
    from natgrad.curvature import KroneckerFactors
    from natgrad.inverses import FactoredInverse

    torch.manual_seed(1)
    curv = KroneckerFactors((3, 5), torch.float64, torch.device("cpu"))
    curv.update(natgrad.LayerStats(torch.randn(6, 2, 5), torch.randn(6, 2, 3)), 0.0)
    V = torch.randn(3, 5)
    eig = EigenInverse(torch.float64, torch.device("cpu"), damping_mode="factored")
    inv = FactoredInverse(torch.float64, torch.device("cpu"))
    eig.refresh(curv, 0.1)
    inv.refresh(curv, 0.1)
    torch.testing.assert_close(eig.apply(V, 0.1), inv.apply(V, 0.1))


# ---------------------------------------------------------------- eigen-corrected (EKFAC, TEKFAC)


CONV_CASES = [  # (kernel, stride, padding, dilation, bias)
    (3, 2, 1, 1, True),
    (3, 1, 0, 1, False),
    (2, 2, 1, 1, True),
    (3, 1, 2, 2, True),
]


def explicit_S(model, name, x, y, Q_A, Q_G):
    per_sample = per_sample_grad_matrices(model, name, x, y)  # (M, d_out, d_in')
    return torch.stack([(Q_G.T @ G_i @ Q_A) ** 2 for G_i in per_sample]).mean(0)


@pytest.mark.parametrize("bias", [True, False])
def test_S_equals_per_sample_second_moment_linear(bias):
    model = tiny_mlp(bias)
    x, y = random_batch(model)
    pre, _ = one_step(natgrad.EKFAC, model, x, y)
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
    x, y = random_batch(model)
    pre, _ = one_step(natgrad.EKFAC, model, x, y)
    for name, layer in pre.layers.items():
        inv = layer.inverse
        ref = explicit_S(model, name, x, y, inv.Q_A, inv.Q_G)
        torch.testing.assert_close(inv.S, ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("model_fn", [tiny_mlp, tiny_cnn])
def test_update_equals_dense_kronecker_basis_solve(model_fn):
    model = model_fn()
    x, y = random_batch(model)
    damping = 3e-3
    pre, grads = one_step(natgrad.EKFAC, model, x, y, damping=damping)
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
    x, y = random_batch(model)
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
    x, y = random_batch(model)
    pre, _ = one_step(natgrad.EKFAC, model, x, y, T_s=1)
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
        x, y = random_batch(model)
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


def test_tekfac_theta_is_the_per_sample_second_moment_in_tkfac_eigenbasis():
    model = tiny_cnn()
    x, y = random_batch(model)
    pre, _ = one_step(natgrad.TEKFAC, model, x, y)
    for name, layer in pre.layers.items():
        inv, curv = layer.inverse, layer.curvature
        for X, Q in ((curv.Phi, inv.Q_A), (curv.Psi, inv.Q_G)):
            D = Q.T @ X @ Q
            torch.testing.assert_close(D, torch.diag(torch.diagonal(D)), atol=1e-12, rtol=0)
        per_sample = per_sample_grad_matrices(model, name, x, y)
        ref = torch.stack([(inv.Q_G.T @ G_i @ inv.Q_A) ** 2 for G_i in per_sample]).mean(0)
        torch.testing.assert_close(inv.S, ref, rtol=1e-10, atol=1e-14)


def test_tekfac_keeps_separate_decays_for_theta_and_the_factors():
    """Gao et al. 2020, eq. 3.3: ``Θ`` averages with ``β₁`` (``rescale_decay``), ``δ``, ``Φ``,
    ``Ψ`` with ``β₂`` (``decay``)."""
    model = tiny_mlp()
    x, y = random_batch(model)
    x2 = x + 0.3 * torch.randn_like(x)
    pre = natgrad.TEKFAC(model, kl_clip=None, T_cov=1, T_inv=100, T_s=1, decay=0.9,
                         rescale_decay=0.5)
    for batch in (x, x2):
        model.zero_grad()
        F.cross_entropy(model(batch), y).backward()
        pre.step()
    for name, layer in pre.layers.items():
        inv, curv = layer.inverse, layer.curvature
        moments = [
            torch.stack([(inv.Q_G.T @ G_i @ inv.Q_A) ** 2
                         for G_i in per_sample_grad_matrices(model, name, b, y)]).mean(0)
            for b in (x, x2)
        ]  # in step 0's basis (T_inv = 100); no optimizer, so the weights never moved
        torch.testing.assert_close(inv.S, 0.5 * moments[0] + 0.5 * moments[1], rtol=1e-10,
                                   atol=1e-14)
        batch_deltas = []
        for b in (x, x2):
            fresh = TraceRestrictedFactors(curv.shape, torch.float64, torch.device("cpu"))
            fresh.update(LayerStats(*reference_rows(model, name, b, y)), 0.0)
            batch_deltas.append(fresh.delta)
        torch.testing.assert_close(curv.delta, 0.9 * batch_deltas[0] + 0.1 * batch_deltas[1])
    with pytest.raises(ValueError, match="rescale_decay"):
        natgrad.TEKFAC(model, rescale_decay=1.0)
    assert natgrad.EKFAC(model, decay=0.8).observe_decay() == 0.8  # None: the factors' decay


def test_tekfac_before_its_first_observation_is_tkfac_with_exact_damping():
    curv = TraceRestrictedFactors((3, 5), torch.float64, torch.device("cpu"))
    curv.update(LayerStats(torch.randn(8, 2, 5), torch.randn(8, 2, 3)), 0.0)
    inv = EigenCorrectedInverse(torch.float64, torch.device("cpu"))
    inv.refresh(curv, 1e-2)
    V = torch.randn(3, 5)
    block = curv.delta * torch.kron(curv.Phi, curv.Psi) + 1e-2 * torch.eye(15)
    ref = unvec(torch.linalg.solve(block, vec(V)), V.shape)
    torch.testing.assert_close(inv.apply(V, 1e-2), ref)


# ---------------------------------------------------------------- Sherman–Morrison (SM-K-FAC)


def random_spd(n, seed):
    torch.manual_seed(seed)
    B = torch.randn(n, n)
    return B @ B.T / n + 0.1 * torch.eye(n)


@pytest.mark.parametrize("n,alpha", [(1, 0.1), (5, 0.1), (30, 2.0)])
def test_sherman_morrison_update_equals_the_dense_inverse(n, alpha):
    X = random_spd(n, n)
    u = torch.rand(n) + 0.1
    out = sherman_morrison_update(torch.linalg.inv(X), u, alpha)
    torch.testing.assert_close(
        out, torch.linalg.inv(X + alpha * torch.outer(u, u)), rtol=1e-9, atol=1e-11
    )


def test_sherman_morrison_update_rejects_a_non_finite_result():
    with pytest.raises(DecompositionError, match="non-finite"):
        sherman_morrison_update(torch.full((2, 2), float("nan")), torch.ones(2), 0.1)


def test_each_refresh_equals_the_dense_inverse_of_its_matrix():
    """``k`` full factored-damping inverses, then every refresh inverts
    ``X_prev + α u uᵀ`` with ``u = sqrt(diag A)`` of the *current* running factor."""
    k, alpha, beta, damping, decay = 2, 0.3, 0.7, 0.05, 0.6
    curv = DiagonalSwitchFactors((4, 5), torch.float64, CPU)
    full = KroneckerFactors((4, 5), torch.float64, CPU)
    inv = ShermanMorrisonInverse(
        torch.float64, CPU, k=k, alpha=alpha, beta=beta, reading="chained"
    )
    X_A = X_G = None
    for j in range(6):
        feed((curv, full), random_stats(j), 0.0 if j == 0 else decay)
        inv.refresh(curv, damping)
        A, G = full.factors()
        if j < k:
            pi = math.sqrt((torch.trace(A) / 5) / (torch.trace(G) / 4))
            X_A = A + pi * math.sqrt(damping) * torch.eye(5)
            X_G = G + math.sqrt(damping) / pi * torch.eye(4)
        else:
            u, v = A.diagonal().sqrt(), G.diagonal().sqrt()
            X_A = X_A + alpha * torch.outer(u, u)
            X_G = X_G + beta * torch.outer(v, v)
        torch.testing.assert_close(inv.A_inv, torch.linalg.inv(X_A), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(inv.G_inv, torch.linalg.inv(X_G), rtol=1e-9, atol=1e-11)
        if j == k - 1:
            curv.switch_to_diagonal()
    assert (inv.full_updates, inv.rank_one_updates) == (k, 4)
    V = torch.randn(4, 5)
    torch.testing.assert_close(
        inv.apply(V, damping), torch.linalg.solve(X_G, V) @ torch.linalg.inv(X_A)
    )


def test_k_zero_starts_from_the_damping_alone():
    damping = 0.04
    curv = DiagonalSwitchFactors((4, 5), torch.float64, CPU, diagonal_only=True)
    curv.update(random_stats(0), 0.0)
    inv = ShermanMorrisonInverse(torch.float64, CPU, k=0, alpha=0.1, beta=0.1, reading="chained")
    inv.refresh(curv, damping)
    d_A, d_G = curv.diagonals()
    pi = math.sqrt((d_A.sum() / 5) / (d_G.sum() / 4))
    X_A = pi * math.sqrt(damping) * torch.eye(5) + 0.1 * torch.outer(d_A.sqrt(), d_A.sqrt())
    X_G = math.sqrt(damping) / pi * torch.eye(4) + 0.1 * torch.outer(d_G.sqrt(), d_G.sqrt())
    torch.testing.assert_close(inv.A_inv, torch.linalg.inv(X_A), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(inv.G_inv, torch.linalg.inv(X_G), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_paper_reading_reuses_the_last_full_inverse_for_every_rank_one_update(k):
    """The paper's text (eqs. 7–8): ``A_t⁻¹ ≈ (A_k + α u_t u_tᵀ)⁻¹`` with ``A_k`` the damped
    factor of the last full update, and Algorithm 1's ``t <= k`` (``t`` from 0): ``k + 1``
    full inverses, ``t = 0 … k``. Dense inverses of the matrices the paper names."""
    alpha, beta, damping, decay = 0.3, 0.7, 0.05, 0.6
    curv = DiagonalSwitchFactors((4, 5), torch.float64, CPU)
    full = KroneckerFactors((4, 5), torch.float64, CPU)
    inv = ShermanMorrisonInverse(
        torch.float64, CPU, k=k, alpha=alpha, beta=beta, reading="paper"
    )
    assert inv.full_inverses == k + 1
    for t in range(k + 5):
        feed((curv, full), random_stats(t), 0.0 if t == 0 else decay)
        assert inv.in_rank_one_phase == (t > k)
        inv.refresh(curv, damping)
        A, G = full.factors()
        if t <= k:
            pi = math.sqrt((torch.trace(A) / 5) / (torch.trace(G) / 4))
            A_k = A + pi * math.sqrt(damping) * torch.eye(5)
            G_k = G + math.sqrt(damping) / pi * torch.eye(4)
            X_A, X_G = A_k, G_k
        else:
            u, v = A.diagonal().sqrt(), G.diagonal().sqrt()
            X_A = A_k + alpha * torch.outer(u, u)  # from A_k every time, not chained
            X_G = G_k + beta * torch.outer(v, v)
        torch.testing.assert_close(inv.A_inv, torch.linalg.inv(X_A), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(inv.G_inv, torch.linalg.inv(X_G), rtol=1e-9, atol=1e-11)
        if t == k:
            curv.switch_to_diagonal()
    assert (inv.full_updates, inv.rank_one_updates) == (k + 1, 4)
    V = torch.randn(4, 5)
    torch.testing.assert_close(
        inv.apply(V, damping), torch.linalg.solve(X_G, V) @ torch.linalg.inv(X_A)
    )


def test_the_readings_differ_after_two_rank_one_updates_and_agree_before():
    """Same ``k + 1`` full inverses for both (chained given ``k + 1``): the first rank-one
    update is the same, the second differs (chained keeps the first's term)."""
    readings = {
        "paper": ShermanMorrisonInverse(torch.float64, CPU, k=1, reading="paper"),
        "chained": ShermanMorrisonInverse(torch.float64, CPU, k=2, reading="chained"),
    }
    curvs = {r: DiagonalSwitchFactors((4, 5), torch.float64, CPU) for r in readings}
    for t in range(4):
        for r, inv in readings.items():
            curvs[r].update(random_stats(t), 0.0 if t == 0 else 0.5)
            inv.refresh(curvs[r], 0.05)
        same = torch.allclose(readings["paper"].A_inv, readings["chained"].A_inv)
        assert same == (t < 3), t


def test_paper_reading_state_round_trip_and_an_older_checkpoint():
    curv = DiagonalSwitchFactors((4, 5), torch.float64, CPU)
    inv = ShermanMorrisonInverse(torch.float64, CPU, k=0, reading="paper")
    for t in range(3):
        curv.update(random_stats(t), 0.5)
        inv.refresh(curv, 0.05)
    state = inv.state_dict()
    copy_ = ShermanMorrisonInverse(torch.float64, CPU, k=0, reading="paper")
    copy_.load_state_dict(state)
    torch.testing.assert_close(copy_.A_base_inv, inv.A_base_inv)
    old = {k: v for k, v in state.items() if "base" not in k}
    copy_.load_state_dict(old)  # written before the base inverses were kept
    assert copy_.A_base_inv is None and copy_.rank_one_updates == 2
    copy_.refresh(curv, 0.05)  # continues from the current inverses
    assert torch.isfinite(copy_.A_inv).all()
    with pytest.raises(ValueError, match="reading must be one of.*'paper'.*got 'book'"):
        ShermanMorrisonInverse(torch.float64, CPU, reading="book")


# ---------------------------------------------------------------- Woodbury (SKFAC)


def dense_damped_inverse(Y, damping):
    """``(λI + YᵀY/m)⁻¹`` the slow, obvious way."""
    n = Y.shape[1]
    return torch.linalg.inv(damping * torch.eye(n) + Y.T @ Y / Y.shape[0])


@pytest.mark.parametrize("m,n", [(5, 12), (3, 40), (12, 12), (20, 7)])
def test_woodbury_left_and_right_equal_the_dense_inverse(m, n):
    torch.manual_seed(m * n)
    Y, damping = torch.randn(m, n), 0.07
    X_inv = dense_damped_inverse(Y, damping)
    L = woodbury_cholesky(Y, damping)
    V_left, V_right = torch.randn(n, 4), torch.randn(3, n)
    torch.testing.assert_close(
        woodbury_left(Y, L, damping, V_left), X_inv @ V_left, rtol=1e-9, atol=1e-11
    )
    torch.testing.assert_close(
        woodbury_right(V_right, Y, L, damping), V_right @ X_inv, rtol=1e-9, atol=1e-11
    )
    if m < n:
        torch.testing.assert_close(woodbury_explicit(Y, L, damping), X_inv, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("m", [2, 4, 9, 30])
def test_woodbury_inverse_applies_the_damped_kronecker_inverse(m):
    torch.manual_seed(m)
    d_out, d_in, damping = 6, 15, 0.03
    Y_A, Y_G = torch.randn(m, d_in), torch.randn(m, d_out)
    inv = WoodburyInverse(torch.float64, CPU)
    inv.refresh(curvature_from(Y_A, Y_G), damping)
    assert (inv.inv_A is None) == (2 * m < d_in) and (inv.inv_G is None) == (2 * m < d_out)
    V = torch.randn(d_out, d_in)
    A = Y_A.T @ Y_A / m + damping * torch.eye(d_in)
    G = Y_G.T @ Y_G / m + damping * torch.eye(d_out)
    ref = unvec(torch.linalg.solve(torch.kron(A, G), vec(V)), V.shape)
    torch.testing.assert_close(inv.apply(V, damping), ref, rtol=1e-9, atol=1e-11)
    # the damping is that of the refresh, whatever apply is passed
    torch.testing.assert_close(inv.apply(V, 123.0), ref, rtol=1e-9, atol=1e-11)


def test_woodbury_path_never_forms_an_n_by_n_matrix():
    torch.manual_seed(0)
    m, d_out, d_in = 8, 50, 300
    curv = curvature_from(torch.randn(m, d_in), torch.randn(m, d_out))
    inv = WoodburyInverse(torch.float64, CPU)
    with ShapeRecorder() as rec:
        inv.refresh(curv, 1e-2)
        inv.apply(torch.randn(d_out, d_in), 1e-2)
    assert (d_in, d_in) not in rec.shapes and (d_out, d_out) not in rec.shapes
    assert (m, m) in rec.shapes  # the kernel K and its Cholesky factor


def test_failed_woodbury_refresh_leaves_the_inverse_untouched():
    torch.manual_seed(0)
    inv = WoodburyInverse(torch.float64, CPU)
    inv.refresh(curvature_from(torch.randn(3, 10), torch.randn(3, 5)), 0.1)
    before = inv.state_dict()
    bad = torch.randn(3, 10)
    bad[0, 0] = float("nan")
    with pytest.raises(DecompositionError, match="Woodbury kernel"):
        inv.refresh(curvature_from(bad, torch.randn(3, 5)), 0.1)
    for key, value in inv.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key])
        else:
            assert value == before[key]
    with pytest.raises(TypeError, match="needs a BatchMatrices curvature"):
        inv.refresh(KroneckerFactors((5, 10), torch.float64, CPU), 0.1)


def test_woodbury_is_not_ready_with_only_the_damping():
    """What a worker holds for a layer it does not own under ``share="gradient"``: the
    owner's numbers without its tensors. It must not claim to be ready."""
    inv = WoodburyInverse(torch.float64, torch.device("cpu"))
    inv.damping = 1e-3
    assert not inv.ready
    curv = BatchMatrices((3, 5), torch.float64, torch.device("cpu"))
    curv.update(natgrad.LayerStats(torch.randn(4, 1, 5), torch.randn(4, 1, 3)), 0.0)
    inv.refresh(curv, 1e-3)
    assert inv.ready


def test_float32_layers_keep_the_woodbury_kernel_in_float64():
    """``K = mλI + YYᵀ`` with a small ``λ`` is too ill-conditioned for float32 Cholesky; it
    is formed and factored in float64, and a state round trip keeps it so."""
    torch.manual_seed(0)
    Y_A = (torch.rand(16, 3) @ torch.rand(3, 60) * 30).float()  # rank 3: K is near-singular
    Y_G = torch.randn(16, 40).float()
    K32 = Y_A @ Y_A.T + 16e-6 * torch.eye(16)
    assert torch.linalg.cholesky_ex(K32).info.item() != 0  # float32 cannot factor it
    curv = BatchMatrices((40, 60), torch.float32, CPU)
    curv.Y_A, curv.Y_G = Y_A, Y_G
    inv = WoodburyInverse(torch.float32, CPU)
    inv.refresh(curv, 1e-6)
    assert inv.chol_A.dtype == torch.float64 and inv.Y_A.dtype == torch.float32
    V = torch.randn(40, 60).float()
    out = inv.apply(V, 1e-6)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    twin = WoodburyInverse(torch.float32, CPU)
    twin.load_state_dict(copy.deepcopy(inv.state_dict()))
    assert twin.chol_A.dtype == torch.float64
    assert torch.equal(twin.apply(V, 1e-6), out)
    with pytest.raises(KeyError, match=r"missing \['chol_A'\]"):
        twin.load_state_dict({k: v for k, v in inv.state_dict().items() if k != "chol_A"})
    assert torch.equal(twin.apply(V, 1e-6), out)  # a failed load changes nothing
