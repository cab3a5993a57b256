"""EKFAC's and TEKFAC's eigenvalue-corrected inverse with a wide input factor kept as its
top-``k`` eigenvectors plus one isotropic complement
(natgrad/inverses/low_rank_eigen_corrected.py), against references built the slow way:
the complement's basis from ``eigh(I − UUᵀ)``, the Kronecker block formed explicitly and
solved, per-sample gradients from ``torch.func`` projected with explicit ``n × n``
projectors, and EKFAC with the full eigenbasis."""


import pytest
import torch
import torch.nn.functional as F
from helpers import assert_resume_bit_identical, one_step, random_batch, tiny_cnn, tiny_mlp, train
from reference import per_sample_grad_matrices, unvec, vec
from torch import nn

import natgrad
from natgrad.capture import LayerStats
from natgrad.curvature import KroneckerFactors
from natgrad.errors import DecompositionError
from natgrad.inverses import EigenCorrectedInverse, LowRankEigenCorrectedInverse
from natgrad.persample import basis_second_moment, complement_second_moment

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

DAMPING = 1e-3
CPU = torch.device("cpu")
CONV_CASES = [  # (kernel, stride, padding, dilation, bias)
    (3, 2, 1, 1, True),
    (3, 1, 0, 1, False),
    (2, 2, 1, 1, True),
    (3, 1, 2, 2, True),
]


def make(shape, rank, **kw):
    return LowRankEigenCorrectedInverse(torch.float64, CPU, shape=shape, rank=rank, **kw)


def rows(m, p, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, p, d_in, generator=g, dtype=torch.float64)
    return LayerStats(a, torch.randn(m, p, d_out, generator=g, dtype=torch.float64))


def fitted(shape, rank, m=30, p=2, seed=0, **kw):
    """A low-rank inverse refreshed on the factors of one batch and fitted to it."""
    d_out, d_in = shape
    stats = rows(m, p, d_in, d_out, seed)
    curvature = KroneckerFactors(shape, torch.float64, CPU)
    curvature.update(stats, 0.0)
    inverse = make(shape, rank, iterations=6, **kw)
    inverse.refresh(curvature, DAMPING)
    inverse.observe(stats, 0.95)
    return inverse, curvature, stats


def complement_basis(U):
    """An orthonormal basis of the complement of ``U``'s columns, from ``eigh(I − UUᵀ)``
    (independent of the QR the class's ``dense`` uses)."""
    n, k = U.shape
    return torch.linalg.eigh(torch.eye(n, dtype=U.dtype) - U @ U.T)[1][:, k:]


def explicit_block(inverse, damping):
    """``(Q̃_A ⊗ Q_G) diag(vec S̃ + λ) (Q̃_A ⊗ Q_G)ᵀ`` with ``Q̃_A = [U, U_⊥]``."""
    n, k = inverse.U.shape
    Q_A = torch.cat([inverse.U, complement_basis(inverse.U)], dim=1)
    S = torch.cat([inverse.S_k, inverse.s_perp[:, None].repeat(1, n - k)], dim=1)
    K = torch.kron(Q_A, inverse.Q_G.contiguous())
    return K @ torch.diag(vec(S) + damping) @ K.T


def explicit_scales(per_sample, U, Q_G):
    """``S_k`` and ``s_⊥`` from per-sample gradients ``(M, d_out, n)`` and an explicit
    projector ``P = I − UUᵀ``."""
    n, k = U.shape
    rotated = torch.stack([Q_G.T @ G_i for G_i in per_sample])
    P = torch.eye(n, dtype=U.dtype) - U @ U.T
    S_k = (rotated @ U).square().mean(0)
    s_perp = (rotated @ P).square().sum(2).mean(0) / (n - k)
    return S_k, s_perp


# ---------------------------------------------------------------- the pure functions
@pytest.mark.parametrize("shape", [(6, 1, 9, 3), (4, 2, 9, 3), (3, 50, 9, 3), (7, 4, 10, 12)])
def test_second_moments_on_the_kept_columns_and_the_complement_match_einsum(shape):
    m, p, d_in, d_out = shape
    k = 4
    a = torch.randn(m, p, d_in, dtype=torch.float64)
    g = torch.randn(m, p, d_out, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(d_in, k, dtype=torch.float64))[0]
    Q_G = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))[0]
    grads = torch.einsum("mpo,mpi->moi", g, a)
    S_k, s_perp = explicit_scales(grads, U, Q_G)
    for chunk in ({}, {"chunk_elements": 1}):  # chunked: one sample at a time
        torch.testing.assert_close(basis_second_moment(a, g, U, Q_G, **chunk), S_k)
        torch.testing.assert_close(complement_second_moment(a, g, U, Q_G, **chunk), s_perp)


# ---------------------------------------------------------------- one inverse
@pytest.mark.parametrize("p", [1, 3])
def test_apply_equals_solving_with_the_explicit_block(p):
    shape, k = (5, 17), 4
    inverse, curvature, _ = fitted(shape, k, p=p)
    V = torch.randn(*shape, dtype=torch.float64)
    block = explicit_block(inverse, DAMPING)
    expected = unvec(torch.linalg.solve(block, vec(V)), shape)
    got = inverse.apply(V, DAMPING)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * expected.abs().max())
    torch.testing.assert_close(inverse.dense(curvature, DAMPING), block, rtol=1e-12, atol=1e-12)
    assert (inverse.s_perp > 0).all()  # the complement is exercised
    exact = EigenCorrectedInverse(torch.float64, CPU)
    exact.refresh(curvature, DAMPING)
    assert not torch.allclose(got, exact.apply(V, DAMPING))  # and it does approximate


@pytest.mark.parametrize("p", [1, 3])
def test_a_factor_of_rank_at_most_k_gives_ekfac_with_the_full_basis(p):
    # M·P = 6 rows: the 20-wide input factor has rank <= 6 <= k, so the complement of U
    # holds no gradient (s_⊥ = 0) and the inverse is EKFAC's, null space and all.
    shape, k = (5, 20), 6
    stats = rows(6 // p, p, shape[1], shape[0], seed=1)
    curvature = KroneckerFactors(shape, torch.float64, CPU)
    curvature.update(stats, 0.0)
    low_rank, exact = make(shape, k), EigenCorrectedInverse(torch.float64, CPU)
    for inverse in (low_rank, exact):
        inverse.refresh(curvature, DAMPING)
        inverse.observe(stats, 0.95)
    torch.testing.assert_close(low_rank.s_perp, torch.zeros(5, dtype=torch.float64), atol=1e-14,
                               rtol=0)
    V = torch.randn(*shape, dtype=torch.float64)
    expected = exact.apply(V, DAMPING)
    torch.testing.assert_close(low_rank.apply(V, DAMPING), expected, rtol=1e-10,
                               atol=1e-10 * expected.abs().max())
    assert low_rank.trace() == pytest.approx(exact.trace(), rel=1e-12)


def test_the_trace_is_the_full_basis_trace_of_the_fit_and_of_the_initialisation():
    shape, k = (6, 23), 5
    inverse, curvature, stats = fitted(shape, k, p=3)
    exact = EigenCorrectedInverse(torch.float64, CPU)
    exact.refresh(curvature, DAMPING)
    # before a fit: γ(Σ Λ + (n − k) r) = tr G · tr A, EKFAC's eigenvalue initialisation
    A, G = curvature.factors()
    assert exact.trace() == pytest.approx((torch.trace(A) * torch.trace(G)).item(), rel=1e-10)
    fresh = make(shape, k, iterations=6)
    fresh.refresh(curvature, DAMPING)
    assert fresh.fresh_basis
    assert fresh.trace() == pytest.approx(exact.trace(), rel=1e-10)
    # after a fit: (1/M) Σ ‖∇W̄_i‖², the trace of S in any full basis
    exact.observe(stats, 0.95)
    assert inverse.trace() == pytest.approx(exact.trace(), rel=1e-10)
    grads = torch.einsum("mpo,mpi->moi", stats.g, stats.a)
    assert inverse.trace() == pytest.approx(grads.square().sum().item() / len(grads), rel=1e-10)


def test_refresh_starts_from_the_previous_basis_and_draws_no_random_numbers():
    g = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([9.0, 7.0, 5.0, 3.0], dtype=torch.float64),
                        0.5 * torch.rand(56, generator=g, dtype=torch.float64)])
    A, G = (Q * values) @ Q.T, torch.eye(3, dtype=torch.float64)

    class Factors:
        def factors(self):
            return A, G

    inverse = make((3, 60), 4, oversample=2, iterations=1, warm_iterations=1)
    state = torch.get_rng_state()
    errors = []
    for _ in range(3):  # the same factor: every warm start is one more iteration
        inverse.refresh(Factors(), DAMPING)
        errors.append((inverse.S_k[0] - values[:4]).abs().max().item())  # γ = 1: S_k = Λ
    assert torch.equal(torch.get_rng_state(), state)
    assert errors[2] < errors[1] / 10 < errors[0] / 100


def test_a_failed_refresh_raises_and_keeps_the_state():
    shape = (4, 15)
    inverse, curvature, _ = fitted(shape, 3)
    before = inverse.state_dict()
    A, G = curvature.factors()
    for bad in (float("nan"), float("inf")):
        broken = A.clone()
        broken[2, 3] = broken[3, 2] = bad

        class Factors:
            def factors(self, broken=broken):
                return broken, G

        with pytest.raises(DecompositionError):
            inverse.refresh(Factors(), DAMPING)
        after = inverse.state_dict()
        for key, value in after.items():
            old = before[key]
            assert torch.equal(value, old) if torch.is_tensor(value) else value == old, key


def test_data_parallel_averages_both_rescalings():
    inverse = make((4, 15), 3)
    assert inverse.observed_keys() == ("S_k", "s_perp")
    assert set(inverse.observed_keys()) < set(inverse.broadcast_keys())
    assert "U" in inverse.broadcast_keys()  # every worker warm-starts from the owner's U


def test_the_refresh_cost_counts_subspace_products():
    shape = (256, 3137)
    cheap = make(shape, 128).refresh_cost(shape)
    assert cheap == 256**3 + 2 * 3137**2 * (128 + 16)
    assert cheap < EigenCorrectedInverse(torch.float64, CPU).refresh_cost(shape) / 5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"rank": 0}, "rank"), ({"rank": 15}, "rank"), ({"oversample": -1}, "oversample"),
     ({"iterations": 0}, "iterations"), ({"warm_iterations": 1.5}, "warm_iterations"),
     ({"observe_every": 0}, "observe_every"), ({"scale_rule": "mean"}, "scale_rule")],
)
def test_bad_inverse_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        make((4, 15), **{"rank": 3, **kwargs})


# ---------------------------------------------------------------- through the methods
@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_only_wide_input_factors_get_the_low_rank_inverse(method):
    # tiny_cnn: conv A 19 × 19, linear A 49 × 49
    pre = natgrad.METHODS[method](tiny_cnn(), low_rank=3, low_rank_above=20)
    assert {n: type(b.inverse) for n, b in pre.layers.items()} == {
        "0": EigenCorrectedInverse,
        "3": LowRankEigenCorrectedInverse,
    }
    pre = natgrad.METHODS[method](tiny_cnn(), low_rank=20, low_rank_above=4)
    assert type(pre.layers["0"].inverse) is EigenCorrectedInverse  # 19 <= k: nothing to cut
    pre = natgrad.METHODS[method](tiny_cnn())
    assert all(type(b.inverse) is EigenCorrectedInverse for b in pre.layers.values())


def assert_rescalings_match(pre, model, x, y) -> list:
    """Every layer's ``S_k`` and ``s_⊥`` equal :func:`explicit_scales` of its torch.func
    per-sample gradients on the batch ``(x, y)``; the explicit ``s_⊥`` per layer."""
    out = []
    for name, layer in pre.layers.items():
        inverse = layer.inverse
        assert isinstance(inverse, LowRankEigenCorrectedInverse)
        per_sample = per_sample_grad_matrices(model, name, x, y)
        S_k, s_perp = explicit_scales(per_sample, inverse.U, inverse.Q_G)
        torch.testing.assert_close(inverse.S_k, S_k, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(inverse.s_perp, s_perp, rtol=1e-10, atol=1e-14)
        out.append(s_perp)
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", [natgrad.EKFAC, natgrad.TEKFAC])
def test_rescalings_equal_per_sample_second_moments_linear(method, bias):
    model = tiny_mlp(bias)  # inputs 6(+1) and 5(+1) wide
    x, y = random_batch(model)
    pre, _ = one_step(method, model, x, y, low_rank=2, low_rank_above=3)
    for s_perp in assert_rescalings_match(pre, model, x, y):
        assert (s_perp > 0).any()


@pytest.mark.parametrize("case", CONV_CASES)
def test_rescalings_equal_per_sample_second_moments_conv(case):
    model = tiny_cnn(*case)
    x, y = random_batch(model)
    pre, _ = one_step(natgrad.EKFAC, model, x, y, low_rank=3, low_rank_above=4)
    assert_rescalings_match(pre, model, x, y)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 4)).double()


@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_first_step_equals_the_full_basis_when_the_batch_rank_fits(method):
    # 4 samples: both input factors (21 and 13 wide) have rank <= 4 < k
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(4, 20, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (4,), generator=g))]
    out = []
    for kw in ({}, {"low_rank": 5, "low_rank_above": 8}):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pre = natgrad.METHODS[method](model, opt, T_cov=1, T_inv=1, kl_clip=None, **kw)
        train(model, pre, opt, data)
        out.append([p.detach().clone() for p in model.parameters()])
    assert all(isinstance(b.inverse, LowRankEigenCorrectedInverse) for b in pre.layers.values())
    for p, q in zip(*out):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_non_finite_batch_leaves_both_rescalings_untouched():
    model = mlp()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 20, generator=g, dtype=torch.float64), torch.randint(0, 4, (9,))
    pre, _ = one_step(natgrad.EKFAC, model, x, y, T_s=1, low_rank=3, low_rank_above=8)
    before = {n: (b.inverse.S_k.clone(), b.inverse.s_perp.clone()) for n, b in pre.layers.items()}
    model.zero_grad()
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    F.cross_entropy(model(x_bad), y).backward()
    with pytest.warns(natgrad.NumericalWarning, match="non-finite"):
        pre.step()
    for name, layer in pre.layers.items():
        assert torch.equal(layer.inverse.S_k, before[name][0])
        assert torch.equal(layer.inverse.s_perp, before[name][1])


@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_resume_restores_the_warm_start_basis_bit_for_bit(method):
    kw = dict(lr=0.05, T_cov=1, T_inv=2, T_s=1, low_rank=2, low_rank_above=4)
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(8, 20, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (8,), generator=g)) for _ in range(7)]

    def fresh():
        model = mlp()
        return (model, *natgrad.build(f"{method}+sgd", model, **kw))

    def restore():
        model = mlp()
        return (model, *natgrad.build(f"{method}+sgd", model, lr=0.05, low_rank=2,
                                      low_rank_above=4))

    # after the cold refresh; after a warm one
    for saved in assert_resume_bit_identical(fresh, data, (1, 4), restore):
        inverse = saved["p"]["layers"]["0"]["inverse"]
        assert inverse["U"].shape == (21, 2) and inverse["S_k"].shape == (12, 2)
    with pytest.raises(ValueError, match="low_rank"):
        natgrad.METHODS[method](mlp()).load_state_dict(saved["p"])


BAD_LOW_RANK = [
    ({"low_rank": 0}, "low_rank"),
    ({"low_rank": 2.5}, "low_rank"),
    ({"low_rank": True}, "low_rank"),
    ({"low_rank": "8"}, "low_rank"),
    ({"low_rank_above": -1}, "low_rank_above"),
    ({"low_rank_above": 1.5}, "low_rank_above"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_LOW_RANK)
@pytest.mark.parametrize("method", ["kfac", "ekfac", "tekfac"])
def test_bad_low_rank_settings_name_the_argument(method, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b.*{kwargs[name]!r}"):
        natgrad.METHODS[method](tiny_cnn(), **kwargs)


@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_low_rank_cannot_be_changed_by_configure(method):
    pre = natgrad.METHODS[method](tiny_cnn(), low_rank=2)
    for change in ({"low_rank": 3}, {"low_rank_above": 10}):
        with pytest.raises(ValueError, match="fixed when the preconditioner is built"):
            pre.configure(**change)
