"""K-FAC's factors from some of a convolution's positions (``statistics_positions``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_cnn

import natgrad
from natgrad.capture import LayerStats
from natgrad.curvature import KroneckerFactors, ThinnedKroneckerFactors
from natgrad.curvature.kronecker import thin_positions
from natgrad.linalg import input_factor, output_factor


def _stats(m=6, p=9, d_in=5, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LayerStats(torch.randn(m, p, d_in, generator=g, dtype=torch.float64),
                      torch.randn(m, p, d_out, generator=g, dtype=torch.float64))


def test_thinned_rows_are_the_drawn_positions_scaled():
    """Dense reference: the rows at the positions a same-seeded generator draws, ``ā``
    times ``sqrt(P/s)``, ``g`` as is."""
    stats = _stats()
    thin = thin_positions(stats, 4, torch.Generator().manual_seed(3))
    index = torch.rand(6, 9, generator=torch.Generator().manual_seed(3)).argsort(1)[:, :4]
    for i in range(6):
        assert len(set(index[i].tolist())) == 4
        assert torch.equal(thin.a[i], stats.a[i, index[i]] * (9 / 4) ** 0.5)
        assert torch.equal(thin.g[i], stats.g[i, index[i]])


def test_thinned_factors_are_unbiased():
    """Averaged over many draws, the thinned ``A`` and ``G`` approach the full ones (the
    ``sqrt(P/s)`` scale is what makes ``A`` unbiased: without it ``A`` is ``s/P`` of it)."""
    stats = _stats(m=4, p=16)
    A, G = input_factor(stats.a), output_factor(stats.g)
    draws = 3000
    A_sum, G_sum = torch.zeros_like(A), torch.zeros_like(G)
    for k in range(draws):
        thin = thin_positions(stats, 4, torch.Generator().manual_seed(k))
        A_sum += input_factor(thin.a)
        G_sum += output_factor(thin.g)
    assert torch.allclose(A_sum / draws, A, rtol=0, atol=0.05 * A.abs().max())
    assert torch.allclose(G_sum / draws, G, rtol=0, atol=0.05 * G.abs().max())


def test_all_positions_or_one_position_layers_are_unchanged():
    full, thinned = (KroneckerFactors((3, 5), torch.float64, torch.device("cpu")),
                     ThinnedKroneckerFactors((3, 5), torch.float64, torch.device("cpu"),
                                             positions=9))
    for seed in range(3):
        full.update(_stats(seed=seed), 0.9)
        thinned.update(_stats(seed=seed), 0.9)
    assert torch.equal(full.A, thinned.A) and torch.equal(full.G, thinned.G)
    linear = LayerStats(torch.randn(6, 1, 5), torch.randn(6, 1, 3))
    assert thin_positions(linear, 1, torch.Generator()) is linear


def _train(model, pre, opt, steps, seed):
    for i in range(steps):
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(8, 2, 8, 8, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()


def test_kfac_with_thinned_statistics_resumes_bit_exact_and_leaves_the_global_rng():
    settings = dict(statistics_positions=5, T_cov=1, T_inv=2)
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = natgrad.KFAC(model, opt, **settings)
    rng = torch.get_rng_state()
    _train(model, pre, opt, 3, 0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(block.curvature.draws == 3 for block in pre.layers.values())
    saved = copy.deepcopy((model.state_dict(), pre.state_dict(), opt.state_dict()))
    _train(model, pre, opt, 3, 10)
    expected = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    model2 = tiny_cnn()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    pre2 = natgrad.KFAC(model2, opt2, **settings)
    model2.load_state_dict(saved[0])
    pre2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    _train(model2, pre2, opt2, 3, 10)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), expected))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_statistics_positions_is_refused(bad):
    with pytest.raises(ValueError, match="statistics_positions"):
        natgrad.KFAC(tiny_cnn(), statistics_positions=bad)
