"""Sherman–Morrison K-FAC (Liu, Gao & Wang 2021): rank-one inverse updates, the switch to diagonal
accumulation and the method end to end, against dense references in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ShapeRecorder, digit_batches, digits_cnn, train

import natgrad
from natgrad.curvature import DiagonalSwitchFactors, KroneckerFactors
from natgrad.curvature.diagonal_switch import input_diagonal, output_diagonal
from natgrad.inverses import ShermanMorrisonInverse
from natgrad.inverses.sherman_morrison import sherman_morrison_update
from natgrad.linalg import DecompositionError

pytestmark = pytest.mark.usefixtures("float64", "one_thread")
CPU = torch.device("cpu")


def random_spd(n, seed):
    torch.manual_seed(seed)
    B = torch.randn(n, n)
    return B @ B.T / n + 0.1 * torch.eye(n)


# ---------------------------------------------------------------- the rank-one update
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


def feed(curvatures, stats, decay):
    for c in curvatures:
        c.update(stats, decay)


def random_stats(seed, m=7, p=3, d_in=5, d_out=4):
    torch.manual_seed(seed)
    return natgrad.LayerStats(torch.randn(m, p, d_in), torch.randn(m, p, d_out))


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


# ---------------------------------------------------------------- diagonal accumulation
def test_diagonal_accumulation_after_the_switch_equals_the_full_factors_diagonal():
    curv = DiagonalSwitchFactors((4, 5), torch.float64, CPU)
    full = KroneckerFactors((4, 5), torch.float64, CPU)
    for j, decay in enumerate([0.0, 0.9, 0.5, 0.95, 0.3, 0.8]):
        if j == 2:
            curv.switch_to_diagonal()
            assert curv.A is None and curv.G is None  # the n×n factors are released
        feed((curv, full), random_stats(10 + j), decay)
    d_A, d_G = curv.diagonals()
    A, G = full.factors()
    torch.testing.assert_close(d_A, A.diagonal(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(d_G, G.diagonal(), rtol=1e-12, atol=1e-13)
    A_t, G_t = curv.factors()  # introspection: the tracked diagonals, as dense matrices
    torch.testing.assert_close(A_t, torch.diag(A.diagonal()))
    torch.testing.assert_close(G_t, torch.diag(G.diagonal()))


def test_diagonal_of_one_batch_is_o_n_and_matches_the_formula():
    stats = random_stats(3, m=6, p=4, d_in=40, d_out=30)
    a, g = stats.a, stats.g
    A_ref = sum(torch.outer(a[i, t], a[i, t]) for i in range(6) for t in range(4)) / 6
    G_ref = sum(torch.outer(g[i, t], g[i, t]) for i in range(6) for t in range(4)) / 24
    torch.testing.assert_close(input_diagonal(a), A_ref.diagonal())
    torch.testing.assert_close(output_diagonal(g), G_ref.diagonal())
    curv = DiagonalSwitchFactors((30, 40), torch.float64, CPU, diagonal_only=True)
    with ShapeRecorder() as rec:
        curv.update(stats, 0.0)
    assert (40, 40) not in rec.shapes and (30, 30) not in rec.shapes


# ---------------------------------------------------------------- the method


@pytest.mark.parametrize("reading", ["paper", "chained"])
def test_method_switches_after_its_full_updates_and_steps_with_the_dense_inverses(reading):
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


def test_registry_defaults_and_training_across_the_switch():
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


def test_bad_arguments_name_the_argument():
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
