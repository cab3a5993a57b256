"""K-FAC's and EKFAC's factors from some of a convolution's positions
(``statistics_positions``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import one_step, random_batch, tiny_cnn
from reference import per_sample_grad_matrices

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


@pytest.mark.parametrize("method", [natgrad.KFAC, natgrad.EKFAC])
def test_thinned_statistics_resume_bit_exact_and_leave_the_global_rng(method):
    settings = dict(statistics_positions=5, T_cov=1, T_inv=2)
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = method(model, opt, **settings)
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
    pre2 = method(model2, opt2, **settings)
    model2.load_state_dict(saved[0])
    pre2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    _train(model2, pre2, opt2, 3, 10)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), expected))


@pytest.mark.parametrize("method", [natgrad.KFAC, natgrad.EKFAC])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_statistics_positions_is_refused(method, bad):
    with pytest.raises(ValueError, match="statistics_positions"):
        method(tiny_cnn(), statistics_positions=bad)


@pytest.mark.parametrize("method", [natgrad.KFAC, natgrad.EKFAC])
def test_statistics_positions_is_fixed_at_construction(method):
    pre = method(tiny_cnn(), statistics_positions=5)
    with pytest.raises(ValueError, match="statistics_positions is fixed"):
        pre.configure(statistics_positions=7)


def test_ekfac_factors_are_the_thinned_ones_and_its_rescaling_uses_every_position(float64):
    """EKFAC's running ``A``, ``G`` (hence its eigenbasis) come from the drawn positions,
    equal to the dense :func:`input_factor` / :func:`output_factor` of the rows a
    same-seeded draw picks; ``S`` is still the second moment of the whole per-sample
    gradients (every position summed, torch.func reference) in that basis."""
    model = tiny_cnn(seed=0).double()  # conv: 16 positions per 7×7 input
    x, y = random_batch(model)
    x = x.double()
    capture_model = copy.deepcopy(model)
    pre, _ = one_step(natgrad.EKFAC, model, x, y, statistics_positions=5, T_cov=1, T_inv=1,
                      T_s=1, scale_rule="batch")
    block = pre.layers["0"]
    stats = _conv_stats(capture_model, x, y)
    thin = thin_positions(stats, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(block.curvature.A, input_factor(thin.a), rtol=1e-12, atol=0)
    torch.testing.assert_close(block.curvature.G, output_factor(thin.g), rtol=1e-12, atol=0)
    assert not torch.allclose(block.curvature.A, input_factor(stats.a))
    Q_A, Q_G = block.inverse.Q_A, block.inverse.Q_G
    per_sample = per_sample_grad_matrices(model, "0", x, y)
    S = torch.stack([Q_G.T @ g @ Q_A for g in per_sample]).square().mean(0)
    torch.testing.assert_close(block.inverse.S, S, rtol=1e-10, atol=1e-14)


def _conv_stats(model, x, y) -> LayerStats:
    """The first conv layer's rows ``ā`` (unfolded patches and a 1) and ``g`` (the
    mean loss's output gradients times the batch size), by hand."""
    conv = model[0]
    out = {}
    handle = conv.register_forward_hook(lambda m, i, o: out.update(z=o))
    loss = F.cross_entropy(model(x), y)
    handle.remove()
    (gz,) = torch.autograd.grad(loss, out["z"])
    patches = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    a = torch.cat([patches.transpose(1, 2), torch.ones(x.shape[0], patches.shape[2], 1,
                                                       dtype=x.dtype)], 2)
    g = gz.flatten(2).transpose(1, 2) * x.shape[0]
    return LayerStats(a, g)
