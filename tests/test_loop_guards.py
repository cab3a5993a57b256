"""The preconditioner in real training loops: loss scaling, what is listed is what is
preconditioned, misuse of step(), silent no-ops and non-finite gradients, checkpoints
that do not fit, and smaller traps (dtype changes, per-group learning rates, typos)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import digit_batches, digits_cnn
from torch import nn

import natgrad


def cnn_float32():
    return digits_cnn().float()


def batches32(n, size=32, seed=1):
    return [(x.float(), y) for x, y in digit_batches(n, size, seed)]


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------- 1: GradScaler
def test_grad_scaler_gives_the_unscaled_factors_and_direction():
    ((x, y),) = batches32(1)
    plain, scaled = cnn_float32(), cnn_float32()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.05)
    opt_s = torch.optim.SGD(scaled.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    pre_p = natgrad.KFAC(plain, opt_p)
    pre_s = natgrad.KFAC(scaled, opt_s, grad_scaler=scaler)
    F.cross_entropy(plain(x), y).backward()
    pre_p.step()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    pre_s.step()  # unscales the optimizer's gradients itself (unscale_ not called)
    for name, (A, G) in pre_p.factors().items():
        A_s, G_s = pre_s.factors()[name]
        torch.testing.assert_close(A_s, A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(G_s, G, rtol=1e-4, atol=1e-9)
    for name, g in grads_of(plain).items():
        torch.testing.assert_close(grads_of(scaled)[name], g, rtol=1e-4, atol=1e-7)
    scaler.step(opt_s)
    scaler.update()


def test_grad_scaler_direction_is_unscaled_without_kl_clipping():
    """Layers with a bias: their gradient matrix is a copy, taken before the scaler
    unscales ``.grad``; KL clipping's ``ν`` hid a scaled copy, an unclipped step did not."""
    ((x, y),) = batches32(1)
    plain, scaled = cnn_float32(), cnn_float32()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.05)
    opt_s = torch.optim.SGD(scaled.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    pre_p = natgrad.KFAC(plain, opt_p, kl_clip=None)
    pre_s = natgrad.KFAC(scaled, opt_s, grad_scaler=scaler, kl_clip=None)
    F.cross_entropy(plain(x), y).backward()
    pre_p.step()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    pre_s.step()
    assert all(p.bias is not None for p in (plain[0], plain[3]))
    for name, g in grads_of(plain).items():
        torch.testing.assert_close(grads_of(scaled)[name], g, rtol=1e-4, atol=1e-7)


def test_training_with_a_grad_scaler_proceeds():
    model = cnn_float32()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    pre = natgrad.KFAC(model, opt, grad_scaler=scaler, T_cov=2, T_inv=4)
    losses = []
    for x, y in batches32(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        pre.step()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert pre.steps == 30
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_steps_the_scaler_skips_are_skipped():
    model = cnn_float32()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pre = natgrad.KFAC(model, opt, grad_scaler=scaler, T_cov=1)
    (x, y), (x2, y2) = batches32(2)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    pre.step()
    scaler.step(opt)
    scaler.update()
    before = {n: tuple(f.clone() for f in ab) for n, ab in pre.factors().items()}
    params = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    x_bad = x2.clone()
    x_bad[0, 0, 0, 0] = float("inf")
    scaler.scale(F.cross_entropy(model(x_bad), y2)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skip the scaler decides is not a fault
        pre.step()
    scaler.step(opt)
    scaler.update()
    assert pre.steps == 1 and scaler.get_scale() == 2.0**9
    for name, (A, G) in pre.factors().items():
        assert torch.equal(A, before[name][0]) and torch.equal(G, before[name][1])
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name])
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x2), y2)).backward()
    pre.step()
    assert pre.steps == 2 and all(torch.isfinite(g).all() for g in grads_of(model).values())


# --------------------------------------------------------------------- 5: listed = preconditioned
def test_attention_out_proj_is_not_listed_and_warns():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    with pytest.warns(natgrad.UnsupportedLayerWarning, match="attn.out_proj"):
        pre = natgrad.KFAC(Attn(), kl_clip=None)
    assert list(pre.layers) == ["head"] and "attn.out_proj" in pre.skipped


def test_weight_norm_linear_is_skipped_with_a_warning():
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 2)
    )
    with pytest.warns(natgrad.UnsupportedLayerWarning, match="0: .*weight"):
        pre = natgrad.KFAC(model, kl_clip=None)
    assert list(pre.layers) == ["2"]
    F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 2, (6,))).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.step()


def test_conv1d_is_skipped_with_a_warning():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 2))
    with pytest.warns(natgrad.UnsupportedLayerWarning, match="0: Conv1d"):
        pre = natgrad.KFAC(model)
    assert "0" in pre.skipped and list(pre.layers) == ["2"]


def test_a_layer_whose_module_is_never_called_warns_once():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(F.linear(x, self.lin.weight, self.lin.bias))

    model = Functional()
    pre = natgrad.KFAC(model, kl_clip=None)
    F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 2, (5,))).backward()
    with pytest.warns(natgrad.UnsupportedLayerWarning, match="'lin'.*never"):
        pre.step()


# --------------------------------------------------------------------- 6: step() misuse
def test_step_twice_for_one_backward_is_an_error():
    model = cnn_float32()
    pre = natgrad.KFAC(model, kl_clip=None)
    ((x, y),) = batches32(1)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    grads = grads_of(model)
    with pytest.raises(RuntimeError, match="step\\(\\) was already called"):
        pre.step()
    assert pre.steps == 1
    for name, g in grads_of(model).items():
        assert torch.equal(g, grads[name])
    F.cross_entropy(model(x), y).backward()  # accumulating into .grad is a new backward
    pre.step()
    assert pre.steps == 2


def test_step_after_remove_is_an_error():
    model = nn.Linear(3, 2)
    pre = natgrad.KFAC(model, kl_clip=None)
    pre.remove()
    F.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
    grad = model.weight.grad.clone()
    with pytest.raises(RuntimeError, match="remove"):
        pre.step()
    assert torch.equal(model.weight.grad, grad)


# --------------------------------------------------------------------- 7: no silent no-ops
def test_mc_fisher_without_sample_fisher_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pre = natgrad.KFAC(model, kl_clip=None, fisher="mc")
    F.cross_entropy(model(torch.randn(5, 3)), torch.randint(0, 2, (5,))).backward()
    with pytest.raises(RuntimeError, match="sample_fisher"):
        pre.step()


def test_a_non_finite_gradient_is_never_passed_on_silently():
    model = cnn_float32()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = natgrad.KFAC(model, opt, T_cov=10)
    (x, y), (x2, y2) = batches32(2)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    opt.zero_grad()
    x_bad = x2.clone()
    x_bad[0, 0, 0, 0] = float("inf")
    F.cross_entropy(model(x_bad), y2).backward()  # a step without a statistics update
    plain = grads_of(model)
    with pytest.warns(natgrad.NumericalWarning, match="non-finite gradient"):
        pre.step()
    assert pre.steps == 1
    for name, g in grads_of(model).items():  # what reaches the optimizer: .grad as it was
        torch.testing.assert_close(g, plain[name], equal_nan=True, rtol=0, atol=0)


# --------------------------------------------------------------------- 8: load_state_dict
def test_load_state_dict_of_other_widths_changes_nothing():
    ((x, y),) = digit_batches(1)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    narrow = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    pres = []
    for model in (wide, narrow):
        pre = natgrad.KFAC(model, kl_clip=None, damping=0.3)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        pres.append(pre)
    pre_wide, pre_narrow = pres
    saved = copy.deepcopy(pre_narrow.state_dict())
    with pytest.raises(ValueError, match=r"layer '1'.*\(16, 16\) does not match \(8, 8\)"):
        pre_narrow.load_state_dict(pre_wide.state_dict())
    fresh = natgrad.KFAC(copy.deepcopy(narrow), kl_clip=None)  # no factors yet to compare
    with pytest.raises(ValueError, match=r"layer '1': saved factors A \(65, 65\), G \(16, 16\)"):
        fresh.load_state_dict(pre_wide.state_dict())
    assert fresh.steps == 0 and fresh.factors() == {}
    after = pre_narrow.state_dict()
    assert after["config"] == saved["config"] and after["steps"] == saved["steps"]
    for name, layer in saved["layers"].items():
        for part in ("curvature", "inverse"):
            for key, value in layer[part].items():
                mine = after["layers"][name][part][key]
                assert torch.equal(mine, value) if torch.is_tensor(value) else mine == value


def test_load_state_dict_of_another_inverse_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    factored = natgrad.KFAC(model, kl_clip=None)
    F.cross_entropy(model(torch.randn(5, 3)), torch.randint(0, 2, (5,))).backward()
    factored.step()
    state = factored.state_dict()
    factored.remove()
    eigen = natgrad.KFAC(model, kl_clip=None, inverse="eigen", damping=0.5)
    with pytest.raises(ValueError, match="inverse"):
        eigen.load_state_dict(state)
    assert eigen.config.inverse == "eigen" and eigen.config.damping == 0.5


# --------------------------------------------------------------------- 9: smaller traps
@pytest.mark.parametrize("method", sorted(natgrad.METHODS))
def test_factors_follow_the_model_dtype(method):
    """model.double() after building: statistics, inverses and Δ follow, for every method
    (steps before and after the cast, each refreshing the inverses)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = natgrad.METHODS[method](model, opt, T_cov=1, T_inv=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    for i in range(4):
        if i == 2:
            model.double()
            x = x.double()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    assert all(A.dtype == G.dtype == torch.float64 for A, G in pre.factors().values())
    assert model[3].weight.grad.dtype == torch.float64
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kl_clipping_reads_the_bias_groups_learning_rate():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 0.01}, {"params": [model.bias], "lr": 1.0}]
    )
    pre = natgrad.KFAC(model, opt, kl_clip=1e-6)
    x = torch.randn(8, 3, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 2, (8,))).backward()
    grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    pre.step()
    clipped = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    delta = pre.precondition({"": grad})[""]
    vdotg = 0.01**2 * (delta[:, :3] * grad[:, :3]).sum() + 1.0**2 * (delta[:, 3] * grad[:, 3]).sum()
    nu = min(1.0, (1e-6 / vdotg.item()) ** 0.5)
    assert nu < 1.0
    assert pre.kl_scale == pytest.approx(nu, rel=1e-9)
    torch.testing.assert_close(clipped, nu * delta)


def test_an_exclude_pattern_that_matches_nothing_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="exclude pattern 'haed' matches no module"):
        natgrad.KFAC(model, exclude=["haed"])


def test_sample_fisher_on_sequence_logits():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    pre = natgrad.KFAC(model, kl_clip=None, fisher="mc")
    tokens = torch.randint(0, 7, (3, 5))
    logits = model(tokens)  # (B, T, V)
    pre.sample_fisher(logits)
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    pre.step()
    A, G = pre.factors()["1"]
    assert A.shape == (5, 5) and G.shape == (7, 7) and torch.isfinite(G).all() and G.trace() > 0


def test_frozen_layers_get_no_factors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    pre = natgrad.KFAC(model, kl_clip=None)
    F.cross_entropy(model(torch.randn(5, 3)), torch.randint(0, 2, (5,))).backward()
    pre.step()
    assert "0" not in pre.layers and set(pre.factors()) == {"2"}


def test_quadratic_step_under_autocast_and_a_grad_scaler_sizes_the_step_itself():
    """The tapped output gradient is the scaled loss's: it is unscaled before the targets
    are read back from it, and bf16 outputs are read in float32, so the quadratic model
    sizes the step (no fallback warning) and the step equals the unscaled run's."""
    ((x, y),) = batches32(1)
    plain, scaled = cnn_float32(), cnn_float32()
    settings = dict(step_size="quadratic", lm_damping=True, T_lm=1, kl_clip=None)
    opt_p = torch.optim.SGD(plain.parameters(), lr=1.0)
    opt_s = torch.optim.SGD(scaled.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    pre_p = natgrad.KFAC(plain, opt_p, **settings)
    pre_s = natgrad.KFAC(scaled, opt_s, grad_scaler=scaler, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", natgrad.NumericalWarning)
        for _ in range(2):
            for model, opt, pre, scale in ((plain, opt_p, pre_p, None),
                                           (scaled, opt_s, pre_s, scaler)):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                (loss if scale is None else scale.scale(loss)).backward()
                pre.step()
                if scale is None:
                    opt.step()
                else:
                    scale.step(opt)
                    scale.update()
    rule_p, rule_s = pre_p.quadratic_model.rule, pre_s.quadratic_model.rule
    assert rule_s.ready and rule_s.alpha == pytest.approx(rule_p.alpha, rel=1e-4)
    assert pre_s.quadratic_model.ratio.last == pytest.approx(
        pre_p.quadratic_model.ratio.last, rel=1e-3)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
