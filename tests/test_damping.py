"""Damping policies against dense solves in float64: TKFAC's and TEKFAC's trace-based
damping in CNNs (per-layer ``λ_l``, the block scale ``β`` of fully connected layers), the
constant ``λ`` of fully connected networks, and which damping ``precondition()`` uses
between steps. (Levenberg–Marquardt damping: test_adaptive.py.)"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import one_step, random_batch, tiny_cnn, tiny_mlp
from reference import eigen_corrected_block, unvec, vec

import natgrad

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def damped_factors(curv, damping, scale=1.0):
    root = math.sqrt(scale * curv.delta)
    eye = lambda n: torch.eye(n)  # noqa: E731
    return (root * curv.Phi + math.sqrt(damping) * eye(curv.Phi.shape[0]),
            root * curv.Psi + math.sqrt(damping) * eye(curv.Psi.shape[0]))


def test_tkfac_update_in_a_fully_connected_network_is_the_damped_kronecker_inverse():
    model = tiny_mlp()
    x, y = random_batch(model)
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
    x, y = random_batch(model)
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


def test_precondition_between_steps_uses_the_dampings_inside_the_inverses():
    """At a refresh boundary the trace rule would give new ``λ_l``, ``β``; a call of
    ``precondition()`` there must still use (and keep) those of the last step."""
    model = tiny_cnn()
    x, y = random_batch(model)
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


def test_tekfac_update_with_trace_damping_equals_dense_solve():
    model = tiny_cnn()
    x, y = random_batch(model)
    damping, floor = 3e-3, 1e-4
    pre, grads = one_step(natgrad.TEKFAC, model, x, y, damping=damping, trace_floor=floor)
    conv = pre.layers["0"]
    lam_conv = max(conv.inverse.S.sum().item(), floor) / conv.inverse.S.numel()
    assert pre.layer_dampings()["0"] == pytest.approx(lam_conv, rel=1e-12)
    deltas = pre.precondition(grads)
    for name, scale, lam in (("0", 1.0, lam_conv), ("3", lam_conv, damping)):
        block = scale * eigen_corrected_block(pre.layers[name].inverse)
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
        x, y = random_batch(model, seed=10 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = pre.grad_matrices()
        pre.step()
        written = pre.grad_matrices()
        conv = pre.layers["0"].inverse
        lam_conv = max(conv.S.sum().item(), floor) / conv.S.numel()
        for name, scale, lam in (("0", 1.0, lam_conv), ("3", lam_conv, damping)):
            block = scale * eigen_corrected_block(pre.layers[name].inverse)
            block += lam * torch.eye(block.shape[0])
            ref = unvec(torch.linalg.solve(block, vec(grads[name])), grads[name].shape)
            torch.testing.assert_close(written[name], ref, rtol=1e-9, atol=1e-12)
        opt.step()
