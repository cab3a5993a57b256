"""TKFAC and TEKFAC against dense references: δ, Φ, Ψ from per-sample quantities, the
trace identities, the updates as explicit solves (with the trace-based CNN damping), the
papers' approximation-error claims, and the relations between K-FAC, EKFAC, TKFAC, TEKFAC."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_cnn
from reference import (
    patches_by_loops,
    per_sample_grad_matrices,
    per_sample_output_grads,
    unvec,
    vec,
)
from torch import nn

import natgrad
from natgrad.capture import LayerStats
from natgrad.curvature import KroneckerFactors, TraceRestrictedFactors
from natgrad.inverses import EigenCorrectedInverse

pytestmark = pytest.mark.usefixtures("float64")


def tiny_mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def data(model, m=9, seed=3):
    torch.manual_seed(seed)
    x = torch.randn(m, 6) if isinstance(model[0], nn.Linear) else torch.randn(m, 2, 7, 7)
    return x, torch.randint(0, 4, (m,))


def one_step(cls, model, x, y, **kw):
    pre = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), kl_clip=None, **kw)
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    pre.step()
    return pre, grads


def reference_rows(model, name, x, y):
    """Rows ``ā`` (by explicit patch loops) and per-sample ``g`` (one backward per sample)."""
    layer = dict(model.named_modules())[name]
    seen = {}
    def keep_input(module, inputs, output):
        seen["x"] = inputs[0]

    handle = layer.register_forward_hook(keep_input)
    model(x)
    handle.remove()
    if isinstance(layer, nn.Conv2d):
        a = patches_by_loops(seen["x"].detach(), layer)
    else:
        a = torch.cat([seen["x"].detach(), torch.ones(len(x), 1)], 1).unsqueeze(1)
    return a, per_sample_output_grads(model, layer, x, y)


def exact_fisher(model, name, x, y):
    per_sample = per_sample_grad_matrices(model, name, x, y)
    vecs = torch.stack([vec(G_i) for G_i in per_sample])
    return vecs.T @ vecs / len(per_sample)


@pytest.mark.parametrize(
    "model_fn", [tiny_mlp, tiny_cnn, lambda: tiny_cnn(stride=1, padding=0, bias=False)]
)
def test_delta_phi_psi_equal_their_per_sample_formulas(model_fn):
    model = model_fn()
    x, y = data(model)
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
    x, y = data(model)
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


def damped_factors(curv, damping, scale=1.0):
    root = math.sqrt(scale * curv.delta)
    eye = lambda n: torch.eye(n)  # noqa: E731
    return (root * curv.Phi + math.sqrt(damping) * eye(curv.Phi.shape[0]),
            root * curv.Psi + math.sqrt(damping) * eye(curv.Psi.shape[0]))


def test_tkfac_update_in_a_fully_connected_network_is_the_damped_kronecker_inverse():
    model = tiny_mlp()
    x, y = data(model)
    damping = 3e-3
    pre, grads = one_step(natgrad.TKFAC, model, x, y, damping=damping)
    assert pre.layer_dampings() == {"0": damping, "2": damping}  # FNN: constant λ
    for name, layer in pre.layers.items():
        Phi_d, Psi_d = damped_factors(layer.curvature, damping)
        V = grads[name]
        ref = unvec(torch.linalg.solve(torch.kron(Phi_d, Psi_d), vec(V)), V.shape)
        torch.testing.assert_close(pre.grad_matrices()[name], ref, rtol=1e-9, atol=1e-12)


def test_tkfac_trace_damping_in_a_cnn():
    model = tiny_cnn()
    x, y = data(model)
    damping, floor = 3e-3, 1e-3
    pre, grads = one_step(natgrad.TKFAC, model, x, y, damping=damping, trace_floor=floor)
    conv, fc = pre.layers["0"], pre.layers["3"]
    lam_conv = max(conv.curvature.delta, floor) / (3 * 19)  # dim = d_out · d_in'
    beta = lam_conv  # the only conv layer
    assert pre.layer_dampings()["0"] == pytest.approx(lam_conv, rel=1e-12)
    # conv: (sqrt(δ)Φ + sqrt(λ_l)I) ⊗ (sqrt(δ)Ψ + sqrt(λ_l)I)
    Phi_d, Psi_d = damped_factors(conv.curvature, lam_conv)
    ref = unvec(torch.linalg.solve(torch.kron(Phi_d, Psi_d), vec(grads["0"])), grads["0"].shape)
    torch.testing.assert_close(pre.grad_matrices()["0"], ref, rtol=1e-9, atol=1e-12)
    # FC inside a CNN: the block β·δ Φ⊗Ψ, damped with the constant λ
    Phi_d, Psi_d = damped_factors(fc.curvature, damping, scale=beta)
    ref = unvec(torch.linalg.solve(torch.kron(Phi_d, Psi_d), vec(grads["3"])), grads["3"].shape)
    torch.testing.assert_close(pre.grad_matrices()["3"], ref, rtol=1e-9, atol=1e-12)
    # switched off: the constant λ everywhere
    pre.configure(adaptive_damping=False)
    assert set(pre.layer_dampings().values()) == {damping}


def tekfac_block(inv):
    K = torch.kron(inv.Q_A, inv.Q_G)
    return K @ torch.diag(vec(inv.S)) @ K.T


def test_precondition_between_steps_uses_the_dampings_inside_the_inverses():
    """At a refresh boundary the trace rule would give new ``λ_l``, ``β``; a call of
    ``precondition()`` there must still use (and keep) those of the last step."""
    model = tiny_cnn()
    x, y = data(model)
    pre = natgrad.TKFAC(model, kl_clip=None, T_cov=1, T_inv=2)
    for shift in (0.0, 0.5):
        model.zero_grad()
        F.cross_entropy(model(x + shift), y).backward()
        pre.step()
    in_force = copy.deepcopy(pre.damping_policy.state_dict())
    assert pre.damping_policy.rule(pre.config, pre.layers) != in_force  # the traces moved
    grads = pre.grad_matrices()
    deltas = pre.precondition(grads)
    assert pre.damping_policy.state_dict() == in_force
    dampings, scales = in_force
    for name, grad in grads.items():
        inv = pre.layers[name].inverse
        ref = inv.apply(grad, dampings[name]) / scales[name]
        torch.testing.assert_close(deltas[name], ref, rtol=0, atol=0)


def test_tekfac_theta_is_the_per_sample_second_moment_in_tkfac_eigenbasis():
    model = tiny_cnn()
    x, y = data(model)
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
    x, y = data(model)
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


def test_tekfac_update_with_trace_damping_equals_dense_solve():
    model = tiny_cnn()
    x, y = data(model)
    damping, floor = 3e-3, 1e-4
    pre, grads = one_step(natgrad.TEKFAC, model, x, y, damping=damping, trace_floor=floor)
    conv = pre.layers["0"]
    lam_conv = max(conv.inverse.S.sum().item(), floor) / conv.inverse.S.numel()
    assert pre.layer_dampings()["0"] == pytest.approx(lam_conv, rel=1e-12)
    deltas = pre.precondition(grads)
    for name, scale, lam in (("0", 1.0, lam_conv), ("3", lam_conv, damping)):
        block = scale * tekfac_block(pre.layers[name].inverse)
        block += lam * torch.eye(block.shape[0])
        ref = unvec(torch.linalg.solve(block, vec(grads[name])), grads[name].shape)
        torch.testing.assert_close(deltas[name], ref, rtol=1e-9, atol=1e-12)


def test_tekfac_steps_with_the_trace_of_the_rescaling_observed_in_the_same_step():
    """Gao et al. 2020 eq. 3.5 with ``tr Θ_l`` of the re-scaling in force when the step is
    taken: at step 0 (not TKFAC's ``δ`` from before the first observation) and at every
    later step (not the previous step's ``Θ``). The ``.grad`` written each step is the
    dense solve with the damping from that step's own ``Θ``."""
    model = tiny_cnn()
    damping, floor = 3e-3, 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.TEKFAC(model, opt, kl_clip=None, damping=damping, trace_floor=floor,
                         T_cov=1, T_s=1, T_inv=100)
    for step in range(3):
        x, y = data(model, seed=10 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = pre.grad_matrices()
        pre.step()
        written = pre.grad_matrices()
        conv = pre.layers["0"].inverse
        lam_conv = max(conv.S.sum().item(), floor) / conv.S.numel()
        for name, scale, lam in (("0", 1.0, lam_conv), ("3", lam_conv, damping)):
            block = scale * tekfac_block(pre.layers[name].inverse)
            block += lam * torch.eye(block.shape[0])
            ref = unvec(torch.linalg.solve(block, vec(grads[name])), grads[name].shape)
            torch.testing.assert_close(written[name], ref, rtol=1e-9, atol=1e-12)
        opt.step()


@pytest.mark.parametrize("model_fn", [tiny_mlp, tiny_cnn])
def test_eigen_corrections_are_closer_to_the_exact_fisher(model_fn):
    """George et al. 2018 §3 and Gao et al. 2020, Theorem 3.1, on one batch with decay 0."""
    errors = {}
    base = model_fn()
    x, y = data(base, m=16)
    for cls in (natgrad.KFAC, natgrad.EKFAC, natgrad.TKFAC, natgrad.TEKFAC):
        model = copy.deepcopy(base)
        pre, _ = one_step(cls, model, x, y)
        for name, layer in pre.layers.items():
            exact = exact_fisher(model, name, x, y)
            if cls in (natgrad.EKFAC, natgrad.TEKFAC):
                approx = tekfac_block(layer.inverse)
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


def test_tekfac_before_its_first_observation_is_tkfac_with_exact_damping():
    curv = TraceRestrictedFactors((3, 5), torch.float64, torch.device("cpu"))
    curv.update(LayerStats(torch.randn(8, 2, 5), torch.randn(8, 2, 3)), 0.0)
    inv = EigenCorrectedInverse(torch.float64, torch.device("cpu"))
    inv.refresh(curv, 1e-2)
    V = torch.randn(3, 5)
    block = curv.delta * torch.kron(curv.Phi, curv.Psi) + 1e-2 * torch.eye(15)
    ref = unvec(torch.linalg.solve(block, vec(V)), V.shape)
    torch.testing.assert_close(inv.apply(V, 1e-2), ref)
