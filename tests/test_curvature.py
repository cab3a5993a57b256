"""Curvature estimates against dense references in float64: trace-restricted factors
(TKFAC's δ, Φ, Ψ), diagonal accumulation (SM-K-FAC), batch matrices with Reduce-Sum /
Spatial-Subsampling rows and their running average (SKFAC, both readings), how close
each estimate is to the exact Fisher, and an estimate built from the gradient matrix (the
hook a diagonal or Shampoo-like method uses). (Kronecker factors themselves:
test_capture.py and the dense-solve tests of test_inverses.py.)"""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ShapeRecorder, feed, one_step, random_batch, random_stats, tiny_cnn, tiny_mlp
from reference import (
    eigen_corrected_block,
    exact_fisher,
    patches_by_loops,
    per_sample_output_grads,
    reference_rows,
)
from torch import nn

import natgrad
from natgrad.capture import LayerStats
from natgrad.curvature import (
    BatchMatrices,
    Curvature,
    DiagonalSwitchFactors,
    KroneckerFactors,
    NonFiniteStatistics,
    TraceRestrictedFactors,
)
from natgrad.curvature.batch_matrices import (
    batch_matrices,
    blend_rows,
    reduce_sum_rows,
    sample_positions,
    subsample_rows,
)
from natgrad.curvature.diagonal_switch import input_diagonal, output_diagonal
from natgrad.inverses import EigenCorrectedInverse, InverseStrategy, WoodburyInverse
from natgrad.linalg import input_factor, output_factor

pytestmark = pytest.mark.usefixtures("float64", "one_thread")
CPU = torch.device("cpu")


# ---------------------------------------------------------------- distance to the exact Fisher


@pytest.mark.parametrize("model_fn", [tiny_mlp, tiny_cnn])
def test_eigen_corrections_are_closer_to_the_exact_fisher(model_fn):
    """George et al. 2018 §3 and Gao et al. 2020, Theorem 3.1, on one batch with decay 0."""
    errors = {}
    base = model_fn()
    x, y = random_batch(base, m=16)
    for cls in (natgrad.KFAC, natgrad.EKFAC, natgrad.TKFAC, natgrad.TEKFAC):
        model = copy.deepcopy(base)
        pre, _ = one_step(cls, model, x, y)
        for name, layer in pre.layers.items():
            exact = exact_fisher(model, name, x, y)
            if cls in (natgrad.EKFAC, natgrad.TEKFAC):
                approx = eigen_corrected_block(layer.inverse)
                # both corrections keep the trace exactly, for any layer type
                trace = torch.trace(exact).item()
                assert torch.trace(approx).item() == pytest.approx(trace, rel=1e-10)
            else:
                A, G = layer.curvature.factors()
                approx = torch.kron(A, G)
            errors[cls.__name__, name] = torch.linalg.matrix_norm(exact - approx).item()
    for name in pre.layers:
        assert errors["EKFAC", name] <= errors["KFAC", name] * (1 + 1e-12)
        assert errors["TEKFAC", name] <= errors["TKFAC", name] * (1 + 1e-12)
        assert errors["EKFAC", name] < errors["KFAC", name]  # strictly, on these data


# ---------------------------------------------------------------- trace-restricted factors (TKFAC)


@pytest.mark.parametrize(
    "model_fn", [tiny_mlp, tiny_cnn, lambda: tiny_cnn(stride=1, padding=0, bias=False)]
)
def test_delta_phi_psi_equal_their_per_sample_formulas(model_fn):
    model = model_fn()
    x, y = random_batch(model)
    pre, _ = one_step(natgrad.TKFAC, model, x, y)
    for name, layer in pre.layers.items():
        a, g = reference_rows(model, name, x, y)
        p = a.shape[1]
        Lam = [a_i.T @ a_i for a_i in a]  # Λ_i = Σ_t ā ā ᵀ
        Gam = [g_i.T @ g_i / p for g_i in g]  # Γ_i = (1/|T|) Σ_t g gᵀ
        delta = sum(torch.trace(L) * torch.trace(G) for L, G in zip(Lam, Gam)) / len(x)
        Phi = sum(torch.trace(G) * L for L, G in zip(Lam, Gam)) / len(x) / delta
        Psi = sum(torch.trace(L) * G for L, G in zip(Lam, Gam)) / len(x) / delta
        curv = layer.curvature
        assert curv.delta == pytest.approx(delta.item(), rel=1e-11)
        torch.testing.assert_close(curv.Phi, Phi, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(curv.Psi, Psi, rtol=1e-10, atol=1e-14)
        assert torch.trace(curv.Phi).item() == pytest.approx(1.0, abs=1e-12)
        assert torch.trace(curv.Psi).item() == pytest.approx(1.0, abs=1e-12)
        # the block δ Φ⊗Ψ has trace δ; factors() splits δ evenly
        A, G = curv.factors()
        assert torch.trace(torch.kron(A, G)).item() == pytest.approx(delta.item(), rel=1e-11)


def test_delta_is_the_exact_trace_for_linear_layers():
    model = tiny_mlp()
    x, y = random_batch(model)
    pre, _ = one_step(natgrad.TKFAC, model, x, y)
    for name, layer in pre.layers.items():
        trace_F = torch.trace(exact_fisher(model, name, x, y)).item()
        assert layer.curvature.delta == pytest.approx(trace_F, rel=1e-12)


def test_running_averages_keep_unit_traces():
    curv = TraceRestrictedFactors((3, 4), torch.float64, torch.device("cpu"))
    for decay in (0.0, 0.9, 0.5):
        curv.update(LayerStats(torch.randn(5, 3, 4), torch.randn(5, 3, 3)), decay)
    assert torch.trace(curv.Phi).item() == pytest.approx(1.0, abs=1e-12)
    assert torch.trace(curv.Psi).item() == pytest.approx(1.0, abs=1e-12)
    zero = TraceRestrictedFactors((3, 4), torch.float64, torch.device("cpu"))
    zero.update(LayerStats(torch.randn(5, 1, 4), torch.zeros(5, 1, 3)), 0.0)
    assert zero.delta == 0.0 and torch.trace(zero.Phi).item() == pytest.approx(1.0)


def test_tekfac_equals_ekfac_when_per_sample_norms_are_constant():
    """Φ = E[‖g‖² ā āᵀ]/δ is A/tr A when ‖g_i‖ is the same for every sample (and Ψ = G/tr G
    when ‖ā_i‖ is): the bases coincide, so Θ = S and the updates agree at equal damping."""
    torch.manual_seed(4)
    a, g = torch.randn(12, 1, 5), torch.randn(12, 1, 3)
    stats = LayerStats(a / a.norm(dim=-1, keepdim=True), 2 * g / g.norm(dim=-1, keepdim=True))
    dev, dt = torch.device("cpu"), torch.float64
    kron, trace = KroneckerFactors((3, 5), dt, dev), TraceRestrictedFactors((3, 5), dt, dev)
    kron.update(stats, 0.0)
    trace.update(stats, 0.0)
    torch.testing.assert_close(trace.Phi, kron.A / torch.trace(kron.A))
    torch.testing.assert_close(trace.Psi, kron.G / torch.trace(kron.G))
    ekfac, tekfac = EigenCorrectedInverse(dt, dev), EigenCorrectedInverse(dt, dev)
    for inv, curv in ((ekfac, kron), (tekfac, trace)):
        inv.refresh(curv, 1e-3)
        inv.observe(stats, 0.0)
    torch.testing.assert_close(tekfac.S, ekfac.S)
    V = torch.randn(3, 5)
    torch.testing.assert_close(tekfac.apply(V, 1e-3), ekfac.apply(V, 1e-3))
    # …and with unequal per-sample norms they differ
    skewed = LayerStats(a, g)
    kron.update(skewed, 0.0)
    trace.update(skewed, 0.0)
    for inv, curv in ((ekfac, kron), (tekfac, trace)):
        inv.refresh(curv, 1e-3)
        inv.observe(skewed, 0.0)
    assert not torch.allclose(tekfac.apply(V, 1e-3), ekfac.apply(V, 1e-3))


# ---------------------------------------------------------------- diagonal accumulation (SM-K-FAC)


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


# ---------------------------- batch matrices: Reduce-Sum, Spatial-Subsampling, Linear rows (SKFAC)


def conv_rows(stride=1, padding=1, bias=True, m=3):
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(m, 2, 5, 5)
    a = patches_by_loops(x, conv)  # (M, |T|, d_in')
    g = torch.randn(m, a.shape[1], 3)
    return a, g


@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 0, False), (1, 0, True)])
def test_reduce_sum_factors_equal_their_formula(stride, padding, bias):
    a, g = conv_rows(stride, padding, bias)
    M, P = a.shape[:2]
    curv = BatchMatrices((3, a.shape[2]), torch.float64, CPU, reduction="reduce_sum")
    curv.update(natgrad.LayerStats(a, g), 0.0)
    A_ref = sum(torch.outer(a[i].sum(0), a[i].sum(0)) for i in range(M)) / (M * P)
    G_ref = sum(torch.outer(g[i].sum(0), g[i].sum(0)) for i in range(M)) / (M * P * P)
    A, G = curv.factors()
    assert curv.rows == M
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("s", [1, 2, 5])
def test_subsampling_factors_equal_their_formula_for_a_fixed_generator(s):
    a, g = conv_rows()
    M, P = a.shape[:2]
    curv = BatchMatrices(
        (3, a.shape[2]), torch.float64, CPU, reduction="subsample", samples=s, seed=5
    )
    curv.update(natgrad.LayerStats(a, g), 0.0)
    index = sample_positions(M, P, s, torch.Generator().manual_seed(5))
    assert index.shape == (M, s) and all(len(set(row.tolist())) == s for row in index)
    # rows sqrt(|T|)·ā_{i,t}, m = M·s: (|T|/(M·s)) Σ_i Σ_{t∈T'_i} ā āᵀ; G rows are plain g
    A_ref = sum(torch.outer(a[i, t], a[i, t]) for i in range(M) for t in index[i]) * P / (M * s)
    G_ref = sum(torch.outer(g[i, t], g[i, t]) for i in range(M) for t in index[i]) / (M * s)
    A, G = curv.factors()
    assert curv.rows == M * s
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12)


def test_subsampling_is_unbiased_and_exact_with_every_position():
    a, g = conv_rows(stride=2, padding=0)  # |T| = 4
    M, P = a.shape[:2]
    A_kfac, G_kfac = input_factor(a), output_factor(g)
    # exactly, for s' >= |T| (eqs. 18–19 keep every position)
    for s in (P, P + 3):
        Y_A, Y_G = batch_matrices(natgrad.LayerStats(a, g), "subsample", s, torch.Generator())
        torch.testing.assert_close(Y_A.T @ Y_A / Y_A.shape[0], A_kfac, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Y_G.T @ Y_G / Y_G.shape[0], G_kfac, rtol=1e-12, atol=1e-12)
    # in expectation: the mean over every 2-subset of positions is K-FAC's A and G
    subsets = list(itertools.combinations(range(P), 2))
    A_mean, G_mean = torch.zeros_like(A_kfac), torch.zeros_like(G_kfac)
    for subset in subsets:
        index = torch.tensor(subset).expand(M, 2)
        Y_A, Y_G = subsample_rows(a, index), subsample_rows(g / math.sqrt(P), index)
        A_mean += Y_A.T @ Y_A / Y_A.shape[0] / len(subsets)
        G_mean += Y_G.T @ Y_G / Y_G.shape[0] / len(subsets)
    torch.testing.assert_close(A_mean, A_kfac, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G_mean, G_kfac, rtol=1e-12, atol=1e-12)


def test_linear_rows_are_the_plain_rows_and_factors_are_kfacs():
    torch.manual_seed(1)
    a, g = torch.randn(6, 1, 4), torch.randn(6, 1, 3)
    for reduction in ("reduce_sum", "subsample"):
        curv = BatchMatrices((3, 4), torch.float64, CPU, reduction=reduction, samples=3)
        curv.update(natgrad.LayerStats(a, g), 0.0)
        torch.testing.assert_close(curv.Y_A, a[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(curv.Y_G, g[:, 0], rtol=0, atol=0)
    ref = KroneckerFactors((3, 4), torch.float64, CPU)
    ref.update(natgrad.LayerStats(a, g), 0.0)
    for mine, theirs in zip(curv.factors(), ref.factors()):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reduce_sum_rows(a), a[:, 0])


@pytest.mark.parametrize("reading", ["kfc", "algorithm2"])
def test_model_rows_match_hand_computed_patches_and_per_sample_grads(reading):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)
    )
    x, y = torch.randn(5, 2, 8, 8), torch.randint(0, 4, (5,))
    pre = natgrad.SKFAC(model, kl_clip=None, reading=reading)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    a = patches_by_loops(x, model[0])
    g = per_sample_output_grads(model, model[0], x, y)
    P = a.shape[1]
    curv = pre.layers["0"].curvature
    if reading == "kfc":
        torch.testing.assert_close(curv.Y_A, a.sum(1) / math.sqrt(P), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(curv.Y_G, g.sum(1) / P, rtol=1e-10, atol=1e-12)
        return
    # Algorithm 2: raw sums (m = 5 < 19 = d_in'); G (3 <= 5) is the exact unreduced factor
    torch.testing.assert_close(curv.Y_A, a.sum(1), rtol=1e-10, atol=1e-12)
    flat = g.reshape(-1, 3)
    assert curv.Y_G is None
    torch.testing.assert_close(curv.X_G, flat.T @ flat / 5, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- batch matrices: running average


def test_running_rows_blend_and_batches_of_another_size():
    torch.manual_seed(2)
    old, new = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(blend_rows(old, new, 0.9), 0.9 * old + 0.1 * new)
    torch.testing.assert_close(blend_rows(None, new, 0.9), new)
    short = torch.randn(2, 3)  # e.g. the last batch of an epoch
    out = blend_rows(old, short, 0.9)
    torch.testing.assert_close(out[:2], 0.9 * old[:2] + 0.1 * short)
    torch.testing.assert_close(out[2:], old[2:])  # rows it has no partner for: kept
    long = torch.randn(7, 3)
    out = blend_rows(old, long, 0.9)
    torch.testing.assert_close(out[:5], 0.9 * old + 0.1 * long[:5])
    torch.testing.assert_close(out[5:], long[5:])  # new rows: taken as a first batch
    assert old.shape == (5, 3)  # inputs untouched


def test_curvature_update_is_a_running_average_of_rows():
    torch.manual_seed(4)
    curv = BatchMatrices((2, 3), torch.float64, CPU)
    batches = [(torch.randn(4, 1, 3), torch.randn(4, 1, 2)) for _ in range(3)]
    Y_A = None
    for i, (a, g) in enumerate(batches):
        curv.update(natgrad.LayerStats(a, g), 0.0 if i == 0 else 0.8)
        Y_A = a[:, 0] if Y_A is None else 0.8 * Y_A + 0.2 * a[:, 0]
    torch.testing.assert_close(curv.Y_A, Y_A)


def test_non_finite_batch_leaves_rows_and_generator_untouched():
    a, g = conv_rows()
    curv = BatchMatrices((3, a.shape[2]), torch.float64, CPU, reduction="subsample", samples=2)
    curv.update(natgrad.LayerStats(a, g), 0.0)
    before = curv.state_dict()
    g_bad = g.clone()
    g_bad[0, :, 0] = float("inf")  # every position, so the drawn ones see it
    with pytest.raises(NonFiniteStatistics):
        curv.update(natgrad.LayerStats(a, g_bad), 0.5)
    after = curv.state_dict()
    assert all(
        after[k] is before[k] is None or torch.equal(after[k], before[k]) for k in before
    )


# ---------------------------------------------------------- batch matrices: Algorithm 2 as written


def algorithm2_inverse(Y_full, reduced, M, damping):
    """Tang et al. 2021, Algorithm 2 for one factor, the slow obvious way: ``Y_full`` the
    ``(M·s, n)`` raw rows, ``reduced`` the ``(m, n)`` reduced rows (``Ȳ`` or ``Ỹ``).
    Lines 3–4 / 13–14: ``m ≥ n`` → ``(λI + YᵀY/M)⁻¹`` of the unreduced rows; else lines
    8 / 17: ``λ⁻¹[I − Ỹᵀ(MλI + ỸỸᵀ)⁻¹Ỹ]``."""
    n = Y_full.shape[1]
    eye = torch.eye(n)
    if reduced.shape[0] >= n:
        return torch.linalg.inv(damping * eye + Y_full.T @ Y_full / M)
    K = M * damping * torch.eye(reduced.shape[0]) + reduced @ reduced.T
    return (eye - reduced.T @ torch.linalg.inv(K) @ reduced) / damping


@pytest.mark.parametrize(
    "reduction,samples", [("reduce_sum", 1), ("subsample", 1), ("subsample", 2), ("subsample", 8)]
)
def test_algorithm2_reading_equals_the_papers_inverses(reduction, samples):
    """Raw sums with ``MλI``, and the exact unreduced factor whenever the reduced row count
    reaches the factor's size; two batches, so the running averages are exercised too
    (rows averaged by eqs. 26–27, an exact factor averaged as a matrix)."""
    M, P, n_A, n_G, damping, decay = 6, 4, 10, 3, 0.03, 0.5
    torch.manual_seed(samples)
    batches = [(torch.randn(M, P, n_A), torch.randn(M, P, n_G)) for _ in range(2)]
    curv = BatchMatrices(
        (n_G, n_A), torch.float64, CPU, reduction=reduction, samples=samples, seed=7,
        reading="algorithm2",
    )
    draw = torch.Generator().manual_seed(7)
    ref_rows = {"A": None, "G": None}
    ref_full = {"A": None, "G": None}
    for j, (a, g) in enumerate(batches):
        curv.update(natgrad.LayerStats(a, g), 0.0 if j == 0 else decay)
        if reduction == "reduce_sum":
            reduced = {"A": a.sum(1), "G": g.sum(1)}
        else:
            index = sample_positions(M, P, samples, draw)
            s = index.shape[1]
            reduced = {
                k: torch.stack([r[i, index[i]] for i in range(M)]).reshape(M * s, -1)
                for k, r in (("A", a), ("G", g))
            }
        full = {"A": a.reshape(M * P, n_A), "G": g.reshape(M * P, n_G)}
        w = 0.0 if j == 0 else decay
        for k in "AG":
            ref_rows[k] = reduced[k] if j == 0 else w * ref_rows[k] + (1 - w) * reduced[k]
            gram = full[k].T @ full[k] / M
            ref_full[k] = gram if j == 0 else w * ref_full[k] + (1 - w) * gram
    inv = WoodburyInverse(torch.float64, CPU)
    inv.refresh(curv, damping)
    expected = {}
    for k, n in (("A", n_A), ("G", n_G)):
        m = ref_rows[k].shape[0]
        if m >= n:  # the exact branch: the running unreduced factor
            expected[k] = torch.linalg.inv(damping * torch.eye(n) + ref_full[k])
            assert getattr(curv, f"X_{k}") is not None
        else:
            expected[k] = algorithm2_inverse(ref_rows[k], ref_rows[k], M, damping)
            assert getattr(curv, f"X_{k}") is None
    V = torch.randn(n_G, n_A)
    torch.testing.assert_close(
        inv.apply(V, damping), expected["G"] @ V @ expected["A"], rtol=1e-9, atol=1e-11
    )


def test_algorithm2_single_batch_matches_the_literal_algorithm():
    """One batch, no running average: exactly ``algorithm2_inverse`` on each factor."""
    M, P, n_A, n_G, damping = 5, 9, 12, 4, 0.1
    torch.manual_seed(1)
    a, g = torch.randn(M, P, n_A), torch.randn(M, P, n_G)
    curv = BatchMatrices((n_G, n_A), torch.float64, CPU, reading="algorithm2")
    curv.update(natgrad.LayerStats(a, g), 0.0)
    inv = WoodburyInverse(torch.float64, CPU)
    inv.refresh(curv, damping)
    A_inv = algorithm2_inverse(a.reshape(-1, n_A), a.sum(1), M, damping)  # m = 5 < 12
    G_inv = algorithm2_inverse(g.reshape(-1, n_G), g.sum(1), M, damping)  # m = 5 >= 4
    V = torch.randn(n_G, n_A)
    torch.testing.assert_close(inv.apply(V, damping), G_inv @ V @ A_inv, rtol=1e-9, atol=1e-11)
    # the kfc reading of the same batch: |T| and |T|² smaller factors, never exact
    kfc = BatchMatrices((n_G, n_A), torch.float64, CPU, reading="kfc")
    kfc.update(natgrad.LayerStats(a, g), 0.0)
    A_kfc, G_kfc = kfc.factors()
    A_alg, _ = curv.factors()
    torch.testing.assert_close(A_alg, P * A_kfc)
    torch.testing.assert_close(G_kfc, g.sum(1).T @ g.sum(1) / (M * P * P))
    assert kfc.X_A is None and kfc.X_G is None


def test_linear_layers_read_algorithm1_in_both_readings():
    torch.manual_seed(2)
    a, g = torch.randn(7, 1, 5), torch.randn(7, 1, 9)
    made = {}
    for reading in ("kfc", "algorithm2"):
        curv = BatchMatrices((9, 5), torch.float64, CPU, reading=reading)
        curv.update(natgrad.LayerStats(a, g), 0.0)
        assert curv.X_A is None and curv.X_G is None  # rows, even with m = 7 >= 5
        made[reading] = curv.factors()
    for x, y in zip(made["kfc"], made["algorithm2"]):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="reading must be one of.*got 'mindspore'"):
        BatchMatrices((9, 5), torch.float64, CPU, reading="mindspore")


def test_exact_branch_state_round_trip_and_a_short_batch_keeps_the_branch():
    M, P, n_A, n_G = 6, 4, 10, 3
    torch.manual_seed(4)
    curv = BatchMatrices((n_G, n_A), torch.float64, CPU, reading="algorithm2")
    curv.update(natgrad.LayerStats(torch.randn(M, P, n_A), torch.randn(M, P, n_G)), 0.0)
    assert curv.X_G is not None and curv.Y_A is not None and curv.Y_G is None
    curv.update(natgrad.LayerStats(torch.randn(2, P, n_A), torch.randn(2, P, n_G)), 0.5)
    assert curv.X_G is not None and curv.Y_G is None  # m = 2 < 3, still exact
    other = BatchMatrices((n_G, n_A), torch.float64, CPU, reading="algorithm2")
    other.load_state_dict(curv.state_dict())
    for x, y in zip(other.factors(), curv.factors()):
        torch.testing.assert_close(x, y)


# ------------------------------------------------------ an estimate built from the gradient
class GradientMoments(Curvature):
    """A diagonal and a Shampoo-like estimate from the gradient matrix alone (the rows are
    not used): running ``D = E[∇W̄ ⊙ ∇W̄]`` ``(d_out, d_in')``, ``L = E[∇W̄ ∇W̄ᵀ]``
    ``(d_out, d_out)`` and ``R = E[∇W̄ᵀ ∇W̄]`` ``(d_in', d_in')``."""

    _state_keys = ("D", "L", "R")

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.D = self.L = self.R = None

    @property
    def initialized(self) -> bool:
        return self.D is not None

    def update(self, stats, decay):
        grad = stats.grad.to(self.dtype)
        batch = {"D": grad * grad, "L": grad @ grad.T, "R": grad.T @ grad}
        for key, value in batch.items():
            old = getattr(self, key)
            setattr(self, key, value if old is None else decay * old + (1 - decay) * value)

    def factors(self):
        return self.R, self.L


class DiagonalInverse(InverseStrategy):
    """``Δ = ∇W̄ / (D + λ)`` elementwise, with ``D`` of the last refresh."""

    _state_keys = ("denominator",)

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.denominator = None

    @property
    def ready(self) -> bool:
        return self.denominator is not None

    def refresh(self, curvature, damping):
        self.denominator = curvature.D + damping

    def apply(self, grad, damping):
        return grad / self.denominator


class DiagonalMethod(natgrad.Preconditioner):
    def make_curvature(self, shape, dtype, device):
        return GradientMoments(shape, dtype, device)

    def make_inverse(self, shape, dtype, device):
        return DiagonalInverse(dtype, device)


def grad_matrix_by_hand(module):
    """``[∇W reshaped to (d_out, ·), ∇b]`` straight from ``.grad``."""
    w = module.weight.grad
    return torch.cat([w.reshape(w.shape[0], -1), module.bias.grad.unsqueeze(1)], 1)


def test_a_curvature_estimate_built_from_the_gradient_matrix():
    """``Curvature.update`` receives ``stats.grad``, the layer's ``∇W̄`` of the step that
    folds the statistics: a diagonal / Shampoo-like estimate needs nothing else."""
    model = tiny_cnn(seed=0)
    decay, damping = 0.7, 0.01
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = DiagonalMethod(model, opt, kl_clip=None, T_cov=2, T_inv=2, decay=decay,
                         damping=damping)
    ref = {}
    for step in range(5):
        x, y = random_batch(model, seed=step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {name: grad_matrix_by_hand(block.module) for name, block in pre.layers.items()}
        pre.step()
        if step % 2 == 0:  # folded on T_cov steps only, the first batch as it is
            for name, G in grads.items():
                batch = {"D": G * G, "L": G @ G.T, "R": G.T @ G}
                old = ref.get(name)
                ref[name] = batch if old is None else {
                    k: decay * old[k] + (1 - decay) * v for k, v in batch.items()
                }
        for name, block in pre.layers.items():
            for key, value in ref[name].items():
                torch.testing.assert_close(getattr(block.curvature, key), value, rtol=1e-12,
                                           atol=1e-15)
            # refreshed on the same steps (T_inv = T_cov): Δ = ∇W̄ / (D + λ)
            delta = grads[name] / (ref[name]["D"] + damping)
            torch.testing.assert_close(grad_matrix_by_hand(block.module), delta, rtol=1e-12,
                                       atol=1e-15)
        opt.step()
    assert set(pre.factors()) == set(pre.layers)


def test_layer_stats_keep_the_gradient_through_a_dtype_change():
    stats = LayerStats(torch.randn(4, 2, 5), torch.randn(4, 2, 3))
    assert stats.grad is None and stats.to(torch.float32).grad is None
    grad = torch.randn(3, 5)
    moved = stats.with_grad(grad).to(torch.float32)
    assert moved.grad.dtype == torch.float32 and moved.a.dtype == torch.float32
    torch.testing.assert_close(moved.grad, grad.float())
