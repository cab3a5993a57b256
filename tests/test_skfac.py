"""SKFAC (Tang et al. 2021): Woodbury application, Reduce-Sum / Spatial-Subsampling rows and the
running batch matrices, against dense references in float64."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ShapeRecorder, digit_batches, digits_cnn, train
from reference import patches_by_loops, per_sample_output_grads, unvec, vec
from torch import nn

import natgrad
from natgrad.curvature import BatchMatrices, KroneckerFactors, NonFiniteStatistics
from natgrad.curvature.batch_matrices import (
    batch_matrices,
    blend_rows,
    reduce_sum_rows,
    sample_positions,
    subsample_rows,
)
from natgrad.inverses import FactoredInverse, WoodburyInverse
from natgrad.inverses.woodbury import (
    woodbury_cholesky,
    woodbury_explicit,
    woodbury_left,
    woodbury_right,
)
from natgrad.linalg import DecompositionError, input_factor, output_factor

pytestmark = pytest.mark.usefixtures("float64", "one_thread")
CPU = torch.device("cpu")


def dense_damped_inverse(Y, damping):
    """``(λI + YᵀY/m)⁻¹`` the slow, obvious way."""
    n = Y.shape[1]
    return torch.linalg.inv(damping * torch.eye(n) + Y.T @ Y / Y.shape[0])


def curvature_from(Y_A, Y_G):
    curv = BatchMatrices((Y_G.shape[1], Y_A.shape[1]), torch.float64, CPU)
    curv.Y_A, curv.Y_G = Y_A, Y_G
    return curv


# ---------------------------------------------------------------- Woodbury application
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


# d_out=6, d_in'=15: Woodbury on both (m=2), Woodbury / explicit from the m×m Cholesky
# (m=4), explicit / direct (m=9), direct on both (m=30)
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


# ---------------------------------------------------------------- rows: RS, SS, Linear
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


# ---------------------------------------------------------------- running average
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


# ---------------------------------------------------------------- Algorithm 2 as written
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


# ---------------------------------------------------------------- the method


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


def test_registry_defaults_and_training():
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


def test_short_last_batch_keeps_training():
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


def test_bad_arguments_name_the_argument():
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
