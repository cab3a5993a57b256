"""K-FAC's wide factors as low rank plus an isotropic rest (natgrad/inverses/low_rank.py),
against dense references built the slow way: ``torch.linalg.eigh``, the approximated
factor formed explicitly, its inverse by ``torch.linalg.inv``."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_resume_bit_identical, tiny_cnn, train
from reference import dense_directions, unvec, vec
from torch import nn

import natgrad
from natgrad.errors import DecompositionError
from natgrad.inverses import FactoredInverse, LowRankFactoredInverse, trace_pi
from natgrad.inverses.low_rank import low_rank_dense, subspace_start, top_eigenpairs

DAMPING = 0.1


class Factors:
    """A curvature that only gives its factors ``(A, G)``."""

    def __init__(self, A, G):
        self.A, self.G = A, G

    def factors(self):
        return self.A, self.G


def gapped(n, top, rest_max, seed):
    """A symmetric PSD ``(n, n)`` matrix with eigenvalues ``top`` and ``n − len(top)``
    more in ``[0, rest_max]``, in a random orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    rest = torch.rand(n - len(top), generator=g, dtype=torch.float64) * rest_max
    values = torch.cat([torch.tensor(top, dtype=torch.float64), rest])
    return (Q * values) @ Q.T


def top_reference(X, k):
    """``(Λ, U)``: the top-``k`` eigenpairs by ``eigh``, descending."""
    values, vectors = torch.linalg.eigh(X)
    return values[-k:].flip(0), vectors[:, -k:].flip(1)


def approximated(X, k, shift):
    """``X̃ + φI = U diag(Λ) Uᵀ + r(I − UUᵀ) + φI`` from ``eigh``, formed explicitly."""
    n = X.shape[0]
    values, U = top_reference(X, k)
    r = (torch.trace(X) - values.sum()) / (n - k)
    eye = torch.eye(n, dtype=X.dtype)
    return U @ torch.diag(values) @ U.T + r * (eye - U @ U.T) + shift * eye


def test_subspace_iteration_finds_the_top_eigenpairs():
    n, k = 80, 6
    X = gapped(n, [10.0, 8.0, 6.0, 4.0, 3.0, 2.0], 1e-2, seed=0)
    values, U = top_eigenpairs(X, k, subspace_start(n, k + 6, X.dtype, X.device), 6)
    ref_values, ref_U = top_reference(X, k)
    torch.testing.assert_close(values, ref_values, rtol=1e-12, atol=1e-12)
    signs = torch.sign((U * ref_U).sum(0))
    torch.testing.assert_close(U * signs, ref_U, rtol=0, atol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=X.dtype), rtol=0, atol=1e-13)


def test_a_warm_start_converges_where_a_cold_one_does_not():
    n, k = 80, 6
    X = gapped(n, [10.0, 8.0, 6.0, 4.0, 3.0, 2.0], 0.5, seed=1)
    nearby = X + 1e-6 * gapped(n, [1.0], 1.0, seed=2)
    previous = top_reference(nearby, k)[1]
    ref_values = top_reference(X, k)[0]
    cold = subspace_start(n, k + 6, X.dtype, X.device)
    warm = cold.clone()
    warm[:, :k] = previous
    cold_error = (top_eigenpairs(X, k, cold, 1)[0] - ref_values).abs().max()
    warm_error = (top_eigenpairs(X, k, warm, 1)[0] - ref_values).abs().max()
    assert warm_error < 1e-10
    assert cold_error > 1e3 * warm_error


def make(shape, rank, above, **kw):
    return LowRankFactoredInverse(
        torch.float64, torch.device("cpu"), shape=shape, rank=rank, above=above, **kw
    )


@pytest.mark.parametrize(("above", "wide"), [(8, "both"), (15, "A"), (0, "both"), (30, "neither")])
def test_apply_equals_the_dense_reference(above, wide):
    d_out, d_in, k = 12, 21, 5
    A = gapped(d_in, [9.0, 7.0, 5.0, 3.0, 2.0], 1e-2, seed=3)
    G = gapped(d_out, [4.0, 3.0, 2.0, 1.5, 1.0], 1e-2, seed=4)
    inverse = make((d_out, d_in), k, above, iterations=8)
    assert (inverse.wide_A, inverse.wide_G) == {
        "both": (True, True),
        "A": (True, False),
        "neither": (False, False),
    }[wide]
    inverse.refresh(Factors(A, G), DAMPING)
    pi, root = trace_pi(A, G), math.sqrt(DAMPING)
    eye_A, eye_G = torch.eye(d_in, dtype=A.dtype), torch.eye(d_out, dtype=A.dtype)
    A_d = approximated(A, k, pi * root) if inverse.wide_A else A + pi * root * eye_A
    G_d = approximated(G, k, root / pi) if inverse.wide_G else G + root / pi * eye_G
    V = torch.randn(d_out, d_in, dtype=torch.float64)
    expected = torch.linalg.inv(G_d) @ V @ torch.linalg.inv(A_d)
    torch.testing.assert_close(inverse.apply(V, DAMPING), expected, rtol=1e-12, atol=1e-12)
    # dense() is the block that apply inverts
    dense = inverse.dense(Factors(A, G), DAMPING)
    torch.testing.assert_close(dense, torch.kron(A_d, G_d), rtol=1e-12, atol=1e-12)
    solved = unvec(torch.linalg.solve(dense, vec(V)), V.shape)
    torch.testing.assert_close(inverse.apply(V, DAMPING), solved, rtol=1e-10, atol=1e-12)


def test_each_refresh_starts_from_the_previous_basis():
    A = gapped(60, [9.0, 7.0, 5.0, 3.0], 0.5, seed=9)
    G = torch.eye(3, dtype=A.dtype)
    inverse = make((3, 60), 4, 8, oversample=2, iterations=1, warm_iterations=1)
    ref_values = top_reference(A, 4)[0]
    errors = []
    for _ in range(3):  # same factor: every warm start is one more iteration
        inverse.refresh(Factors(A, G), DAMPING)
        shift = trace_pi(A, G) * math.sqrt(DAMPING)
        errors.append((inverse.A_scale - shift - ref_values).abs().max().item())
    assert errors[2] < errors[1] / 10 < errors[0] / 100


def test_the_trace_is_kept():
    A, G = gapped(40, [5.0, 4.0, 3.0], 0.3, seed=5), torch.eye(4, dtype=torch.float64)
    inverse = make((4, 40), 3, 8)
    inverse.refresh(Factors(A, G), DAMPING)
    shift = trace_pi(A, G) * math.sqrt(DAMPING)
    A_d = low_rank_dense(inverse.A_basis, inverse.A_scale, inverse.A_rest)
    A_tilde = A_d - shift * torch.eye(40, dtype=A.dtype)
    torch.testing.assert_close(torch.trace(A_tilde), torch.trace(A), rtol=1e-13, atol=0)
    assert not torch.allclose(A_tilde, A, atol=1e-3)  # it does approximate


def test_a_factor_of_rank_at_most_k_gives_the_exact_factored_inverse():
    d_out, d_in, k = 14, 30, 6
    g = torch.Generator().manual_seed(6)
    rows_A = torch.randn(k - 1, d_in, generator=g, dtype=torch.float64)
    rows_G = torch.randn(k, d_out, generator=g, dtype=torch.float64)
    A, G = rows_A.T @ rows_A / 5, rows_G.T @ rows_G / 5  # ranks k − 1 and k
    V = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    low_rank = make((d_out, d_in), k, 10)
    assert low_rank.wide_A and low_rank.wide_G
    exact = FactoredInverse(torch.float64, torch.device("cpu"))
    for inverse in (low_rank, exact):
        inverse.refresh(Factors(A, G), DAMPING)
    torch.testing.assert_close(
        low_rank.apply(V, DAMPING), exact.apply(V, DAMPING), rtol=1e-12, atol=1e-12
    )


def test_a_failed_refresh_raises_and_keeps_the_state():
    A = gapped(30, [5.0, 4.0], 0.1, seed=7)
    G = torch.eye(3, dtype=A.dtype)
    inverse = make((3, 30), 2, 8)
    inverse.refresh(Factors(A, G), DAMPING)
    before = inverse.state_dict()
    for bad in (float("nan"), float("inf")):
        broken = A.clone()
        broken[3, 4] = broken[4, 3] = bad
        with pytest.raises(DecompositionError):
            inverse.refresh(Factors(broken, G), DAMPING)
        after = inverse.state_dict()
        assert after.keys() == before.keys()
        for key, value in after.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, before[key])
            else:
                assert value == before[key]


def test_refresh_does_not_touch_the_global_random_stream():
    A = gapped(30, [5.0, 4.0], 0.1, seed=8)
    inverse = make((3, 30), 2, 8)
    state = torch.get_rng_state()
    inverse.refresh(Factors(A, torch.eye(3, dtype=A.dtype)), DAMPING)  # cold
    inverse.refresh(Factors(A, torch.eye(3, dtype=A.dtype)), DAMPING)  # warm
    assert torch.equal(torch.get_rng_state(), state)


def test_the_refresh_cost_counts_products_for_wide_factors():
    shape = (256, 3137)
    cheap = make(shape, 128, 2048)
    assert cheap.refresh_cost(shape) == 256**3 + 2 * 3137**2 * (128 + 16)
    full = FactoredInverse(torch.float64, torch.device("cpu")).refresh_cost(shape)
    assert cheap.refresh_cost(shape) < full / 5


# ---------------------------------------------------------------- through natgrad.KFAC
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 4))


def batches(n, m=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, 20, generator=g), torch.randint(0, 4, (m,), generator=g)) for _ in range(n)
    ]


def test_kfac_with_low_rank_preconditions_with_its_dense_block(float64):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = natgrad.KFAC(model, opt, low_rank=3, low_rank_above=8, T_cov=1, T_inv=1)
    train(model, pre, opt, batches(3))
    assert {name: type(b.inverse) for name, b in pre.layers.items()} == {
        "0": LowRankFactoredInverse,
        "2": LowRankFactoredInverse,
    }
    assert [(b.inverse.wide_A, b.inverse.wide_G) for b in pre.layers.values()] == [
        (True, True),  # A 21 × 21, G 12 × 12
        (True, False),  # A 13 × 13, G 4 × 4
    ]
    x, y = batches(1, seed=5)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    deltas = pre.precondition(grads)
    dampings, _ = pre.damping_policy.in_force(pre.config, pre.layers, False)
    expected = dense_directions(pre, grads)
    for name, block in pre.layers.items():
        torch.testing.assert_close(deltas[name], expected[name], rtol=1e-8, atol=1e-11)
        exact = FactoredInverse(torch.float64, torch.device("cpu"))
        exact.refresh(block.curvature, dampings[name])
        assert not torch.allclose(deltas[name], exact.apply(grads[name], dampings[name]))


def test_kfac_on_first_step_matches_exact_kfac_when_the_batch_rank_fits():
    # one batch of 4 samples: A (21 × 21, bias column) and G have rank <= 4 <= k
    data = batches(1, m=4)
    out = []
    for kw in ({}, {"low_rank": 5, "low_rank_above": 8}):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pre = natgrad.KFAC(model, opt, T_cov=1, T_inv=1, kl_clip=None, **kw)
        train(model, pre, opt, data)
        out.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*out):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_is_bit_identical_and_draws_no_random_numbers():
    kw = dict(lr=0.05, T_cov=1, T_inv=2, low_rank=2, low_rank_above=4)

    def fresh():
        model = mlp()
        return (model, *natgrad.build("kfac+sgd", model, **kw))

    def restore():
        model = mlp()
        return (model, *natgrad.build("kfac+sgd", model, lr=0.05, low_rank=2, low_rank_above=4))

    # after the cold refresh; after warm ones
    saves = assert_resume_bit_identical(fresh, batches(7), (1, 4), restore)
    for saved in saves:
        assert saved["p"]["layers"]["0"]["inverse"]["A_basis"].shape == (21, 2)
    with pytest.raises(ValueError, match="low_rank"):
        natgrad.KFAC(mlp()).load_state_dict(saved["p"])


def test_low_rank_with_the_eigen_inverse_is_refused():
    """K-FAC's own case; the bad values of ``low_rank`` and ``low_rank_above`` are
    checked for K-FAC, EKFAC and TEKFAC alike in tests/test_lowrank_eigen.py."""
    with pytest.raises(ValueError, match=r"^low_rank\b.*4"):
        natgrad.KFAC(tiny_cnn(), low_rank=4, inverse="eigen")


def test_low_rank_cannot_be_changed_by_configure():
    pre = natgrad.KFAC(tiny_cnn(), low_rank=2)
    with pytest.raises(ValueError, match="low_rank"):
        pre.configure(low_rank=3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"rank": 0}, "rank"), ({"above": -1}, "above"), ({"iterations": 0}, "iterations")],
)
def test_bad_inverse_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        make((3, 30), **{"rank": 2, "above": 8, **kwargs})
