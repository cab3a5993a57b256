"""Every method × every update rule, by name: builds, steps, equals the method in front of
the plain torch optimizer, keeps the factors()/state_dict() contract; and the paper
defaults of METHODS[name](model)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_cnn, train
from reference import unvec, vec
from torch import nn

import natgrad

pytestmark = pytest.mark.usefixtures("float64")

RULES = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "nag": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.9, 0.999), eps=1e-8),
    "radam": lambda p, lr: torch.optim.RAdam(p, lr=lr, betas=(0.9, 0.999), eps=1e-8),
}
FAST = dict(T_cov=1, T_inv=2)  # every code path within a few steps


def batches(n, m=8):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(m, 2, 8, 8, generator=g), torch.randint(0, 4, (m,), generator=g))
        for _ in range(n)
    ]


def test_the_registry_lists_every_method_of_this_issue():
    assert {"kfac", "ekfac", "tkfac", "tekfac"} <= set(natgrad.METHODS)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("method", sorted(natgrad.METHODS))
def test_build_equals_the_method_in_front_of_the_torch_optimizer(method, rule):
    model, twin = tiny_cnn(seed=0), tiny_cnn(seed=0)
    data = batches(4)
    lr = 0.05
    pre, opt = natgrad.build(f"{method}+{rule}", model, lr=lr, **FAST)
    assert type(pre) is natgrad.METHODS[method]
    assert type(opt) is type(RULES[rule]([torch.zeros(1)], lr))
    opt_twin = RULES[rule](twin.parameters(), lr)
    pre_twin = natgrad.METHODS[method](twin, opt_twin, **FAST)
    before = [p.clone() for p in model.parameters()]
    train(model, pre, opt, data)
    train(twin, pre_twin, opt_twin, data)
    for p, q, b in zip(model.parameters(), twin.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert set(pre.factors()) == set(pre.layers)  # the core's factors() contract


@pytest.mark.parametrize("rule", ["nag", "adam", "radam"])
def test_ekfac_update_rules_step_with_the_dense_ekfac_direction(rule):
    """EKFAC-NAG/-Adam/-RAdam (Xu 2021): the optimizer receives exactly
    ``(Q_A⊗Q_G) diag(S+λ)⁻¹ (Q_A⊗Q_G)ᵀ vec(∇W̄)`` as its gradient."""
    model = tiny_cnn(seed=0)
    twin = copy.deepcopy(model)
    (x, y), lr, damping = batches(1)[0], 0.01, 3e-3
    pre, opt = natgrad.build(f"ekfac+{rule}", model, lr=lr, damping=damping, kl_clip=None)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    pre.step()
    opt.step()
    # the reference: dense EKFAC direction written into .grad, then the plain optimizer
    F.cross_entropy(twin(x), y).backward()
    for name, layer in pre.layers.items():
        inv = layer.inverse
        K = torch.kron(inv.Q_A, inv.Q_G)
        delta = unvec(K @ (K.T @ vec(grads[name]) / (vec(inv.S) + damping)), grads[name].shape)
        module = dict(twin.named_modules())[name]
        d_w = module.weight[0].numel()
        module.weight.grad.copy_(delta[:, :d_w].reshape(module.weight.shape))
        module.bias.grad.copy_(delta[:, d_w])
    RULES[rule](twin.parameters(), lr).step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_paper_defaults():
    model = tiny_cnn(seed=0)
    ekfac = natgrad.METHODS["ekfac"](model).config
    assert (ekfac.damping, ekfac.decay, ekfac.T_cov, ekfac.T_inv, ekfac.T_s, ekfac.kl_clip) == (
        1e-3, 0.95, 10, 100, 10, 1e-2
    )
    for name in ("tkfac", "tekfac"):
        config = natgrad.METHODS[name](model).config
        assert config.trace_floor == 0.01 and config.adaptive_damping
    with pytest.raises(ValueError, match="trace_floor must be a finite number > 0, got -1"):
        natgrad.TKFAC(model, trace_floor=-1)
    with pytest.raises(ValueError, match="adaptive_damping must be True or False, got 'yes'"):
        natgrad.TEKFAC(model, adaptive_damping="yes")


def test_methods_train_on_digits():
    from natgrad.experiments.data import digits

    train_set, _ = digits()
    x, y = train_set.tensors
    x = x.reshape(len(x), -1).to(torch.float64)
    for method in ("ekfac", "tkfac", "tekfac"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 10))
        pre, opt = natgrad.build(f"{method}+sgd", model, lr=0.02, damping=1e-2)
        with torch.no_grad():
            before = F.cross_entropy(model(x), y).item()
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            idx = torch.randint(0, len(y), (64,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            pre.step()
            opt.step()
        with torch.no_grad():
            after = F.cross_entropy(model(x), y).item()
        assert after < 0.5 * before, (method, before, after)


# ---------------------------------------------------------------------- build's defaults
def test_build_without_lr_returns_the_recommended_pairing():
    model = tiny_cnn()
    pre, opt = natgrad.build("ekfac", model)
    assert type(opt) is torch.optim.SGD and opt.defaults["lr"] == 1.0
    assert opt.defaults["momentum"] == 0
    assert pre.optimizer is opt
    for key, value in natgrad.compose.RECOMMENDED.items():
        assert getattr(pre.config, key) == value
    assert pre.config.decay == natgrad.EKFAC.config_class().decay  # the method's own
    # LM starts every method from λ = 1e-3, K-FAC too (its class default is 0.1).
    pre, _ = natgrad.build("kfac", tiny_cnn())
    assert pre.config.damping == 1e-3 and natgrad.KFAC.config_class().damping == 0.1
    # Explicit settings win over the recommended ones.
    pre, _ = natgrad.build("kfac", tiny_cnn(), lm_damping=False, damping=0.3)
    assert not pre.config.lm_damping and pre.config.damping == 0.3
    # A method's own recommended settings come on top (K-FAC: thinned conv statistics),
    # in both spellings of the pairing, and explicit ones still win.
    for method in ("kfac", "ekfac", "tekfac"):
        assert natgrad.METHODS[method].recommended
        for spec in (method, f"{method}+plain", f"{method}+sgd", f"{method}+adam"):
            pre, _ = natgrad.build(spec, tiny_cnn())
            for key, value in natgrad.METHODS[method].recommended.items():
                assert getattr(pre.config, key) == value
    pre, _ = natgrad.build("kfac", tiny_cnn(), statistics_positions=None)
    assert pre.config.statistics_positions is None


def test_build_defaults_per_rule_and_the_old_form_with_lr():
    pre, opt = natgrad.build("kfac+adam", tiny_cnn())
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    assert pre.config.step_size == "lr"
    pre, opt = natgrad.build("skfac+sgd", tiny_cnn())
    assert opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.9
    for key, value in natgrad.compose.MOMENTUM_SETTINGS.items():
        assert getattr(pre.config, key) == value
    # With an lr, a bare method is method+sgd with the class defaults, as before.
    pre, opt = natgrad.build("kfac", tiny_cnn(), lr=0.02)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.02
    assert pre.config == natgrad.KFAC.config_class()
    _, opt = natgrad.build("adam", tiny_cnn())
    assert opt.defaults["lr"] == 1e-3


@pytest.mark.parametrize("method", sorted(natgrad.METHODS))
def test_every_method_trains_with_builds_defaults(method):
    """A smoke check (the measured targets are in benchmarks/untuned_digits.py): 30 steps
    on one fixed batch lower the loss by more than half, nothing non-finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4))
    pre, opt = natgrad.build(method, model, curvature_samples=16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 4, (32,), generator=g)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_bench_runs_the_recommended_pairing_as_method_plus_plain():
    from natgrad.experiments.methods import resolve

    spec = resolve("kfac+plain")
    hp = spec.bench_defaults()
    assert hp["lr"] == 1.0 and hp["step_size"] == "quadratic" and hp["lm_damping"]
    pre, opt = spec.build(tiny_cnn(), hp)
    assert pre.config.step_size == "quadratic" and opt.defaults["momentum"] == 0
