"""The contract every registered method keeps, parametrised over ``natgrad.METHODS``: a
method added to the registry is tested by being registered.

(a) ``precondition()`` equals solving with the dense damped block its inverse strategy
    describes (:meth:`InverseStrategy.dense`), divided by the block scale;
(b) with its hooks attached but ``step()`` never called, training equals the plain
    optimizer bit for bit;
(c) resuming from ``state_dict()`` mid-cycle is bit-identical to an uninterrupted run;
(d) a short training run on digits lowers the loss;
(e) bad constructor arguments raise errors naming the argument;
(f) ``precondition()`` between steps leaves ``.grad`` and the step count untouched.

(a) and (c) also run the variants that change what a layer stores (``DENSE_VARIANTS``,
``RESUME_VARIANTS``: wide factors as low rank, K-FAC's eigen form, the MC Fisher).
"""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_batch, digit_batches, digits_cnn, one_step, tiny_cnn, train
from reference import dense_directions

import natgrad

METHODS = sorted(natgrad.METHODS)
FAST = dict(T_cov=1, T_inv=1)
#: Per-method settings where a method's defaults do not exercise what is tested
#: (SKFAC: subsampling and its generator, with the damping its ``m ≪ n`` needs;
#: SM-K-FAC: ``k = 2`` so that a run crosses the switch to rank-one updates).
SETTINGS = {
    "skfac": dict(damping=0.1, reduction="subsample", spatial_samples=3),
    "smkfac": dict(k=2, damping=0.01),
}
#: Wide factors as low rank (tiny_cnn's input factors are 19 and 49 wide).
LOW_RANK = {"low_rank": 2, "low_rank_above": 4}
#: Extra variants of the dense-block contract: (method, extra constructor arguments).
DENSE_VARIANTS = [(m, {}) for m in METHODS] + [(m, LOW_RANK) for m in ("kfac", "ekfac", "tekfac")]
#: Extra variants of the resume contract.
RESUME_VARIANTS = [(m, {}) for m in METHODS] + [
    ("kfac", {"inverse": "eigen"}),
    ("kfac", LOW_RANK),
    ("ekfac", LOW_RANK),
    ("tekfac", LOW_RANK),
    ("kfac", {"fisher": "mc"}),
    ("ekfac", {"fisher": "mc"}),
]


def batches(n, m=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, 2, 7, 7, generator=g), torch.randint(0, 4, (m,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize(("method", "extra"), DENSE_VARIANTS)
def test_precondition_equals_the_dense_damped_block(method, extra, float64):
    model = tiny_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = {**SETTINGS.get(method, {}), **FAST, **extra}
    pre = natgrad.METHODS[method](model, opt, kl_clip=None, **kw)
    train(model, pre, opt, batches(3))
    x, y = batches(1, seed=5)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    deltas = pre.precondition(grads)
    assert set(deltas) == set(pre.layers) == set(grads)
    assert all(block.inverse.ready for block in pre.layers.values())
    expected = dense_directions(pre, grads)
    for name in pre.layers:
        torch.testing.assert_close(deltas[name], expected[name], rtol=1e-8, atol=1e-11)
        assert not torch.allclose(deltas[name], grads[name])  # it preconditions something


@pytest.mark.parametrize("method", METHODS)
def test_hooks_without_step_train_exactly_like_the_plain_optimizer(method):
    model, twin = tiny_cnn(seed=0), tiny_cnn(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    pre = natgrad.METHODS[method](model, opt, **FAST)  # hooks on; step() never called
    data = batches(4)
    losses = train(model, None, opt, data)
    assert train(twin, None, opt_twin, data) == losses
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert pre.steps == 0


@pytest.mark.parametrize(("method", "extra"), RESUME_VARIANTS)
def test_resume_mid_cycle_is_bit_identical(method, extra):
    kw = dict(lr=0.05, T_cov=2, T_inv=3, **SETTINGS.get(method, {}), **extra)
    mc = extra.get("fisher") == "mc"
    data = batches(11)

    def fresh(seed):
        model = tiny_cnn(seed=seed)
        return (model, *natgrad.build(f"{method}+sgd", model, **kw))

    model, pre, opt = fresh(0)
    train(model, pre, opt, data, mc)
    reference = [p.detach().clone() for p in model.parameters()]
    # mid T_cov and T_inv cycles; SM-K-FAC (full updates at steps 0 and 3): before the
    # switch, after it, and after its first rank-one update (step 6)
    for cut in (1, 5, 8):
        model, pre, opt = fresh(0)
        train(model, pre, opt, data[:cut], mc)
        buffer = io.BytesIO()
        torch.save({"m": model.state_dict(), "o": opt.state_dict(), "p": pre.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        # different initial weights and seed: everything must come from the file
        model = tiny_cnn(seed=123)
        # what decides the layers' state (fisher, KFAC's inverse) is given again
        pre, opt = natgrad.build(f"{method}+sgd", model, lr=0.05, seed=99, **extra)
        model.load_state_dict(saved["m"])
        opt.load_state_dict(saved["o"])
        pre.load_state_dict(saved["p"])  # config (T_cov, T_inv, …) comes back with it
        train(model, pre, opt, data[cut:], mc)
        for p, ref in zip(model.parameters(), reference):
            assert torch.equal(p, ref)
    other = "ekfac" if method != "ekfac" else "kfac"
    with pytest.raises(ValueError, match="state was saved by"):
        natgrad.METHODS[other](tiny_cnn()).load_state_dict(saved["p"])


@pytest.mark.parametrize("method", METHODS)
def test_short_digits_training_lowers_the_loss(method):
    model = digits_cnn()
    # one setting for every method: λ = 0.1 (the paper defaults' 1e-3 needs a lower lr)
    kw = dict(lr=0.05, T_cov=2, T_inv=5, **{**SETTINGS.get(method, {}), "damping": 0.1})
    pre, opt = natgrad.build(f"{method}+sgd", model, **kw)
    losses = train(model, pre, opt, [(x.float(), y) for x, y in digit_batches(20)])
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


BAD_ARGUMENTS = [
    (dict(damping=-1.0), ValueError, "damping"),
    (dict(damping=float("nan")), ValueError, "damping"),
    (dict(decay=1.0), ValueError, "decay"),
    (dict(T_cov=0), ValueError, "T_cov"),
    (dict(T_inv=2.5), ValueError, "T_inv"),
    (dict(kl_clip=0.0), ValueError, "kl_clip"),
    (dict(fisher="true"), ValueError, "fisher"),
    (dict(loss_reduction="none"), ValueError, "loss_reduction"),
    (dict(exclude=[3]), TypeError, "exclude"),
    (dict(no_such_setting=1), TypeError, "no_such_setting"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), BAD_ARGUMENTS)
@pytest.mark.parametrize("method", METHODS)
def test_bad_constructor_arguments_name_the_argument(method, kwargs, error, name):
    with pytest.raises(error, match=name):
        natgrad.METHODS[method](tiny_cnn(), **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_bad_configure_arguments_name_the_argument_and_change_nothing(method):
    pre = natgrad.METHODS[method](tiny_cnn())
    before = copy.deepcopy(pre.config)
    with pytest.raises(ValueError, match="damping"):
        pre.configure(damping=-1.0)
    with pytest.raises(ValueError, match="no_such_setting"):
        pre.configure(no_such_setting=1)
    assert pre.config == before


@pytest.mark.parametrize("method", METHODS)
def test_precondition_leaves_grad_and_state_untouched(method, float64):
    x, y = conv_batch()
    model = tiny_cnn()
    settings = SETTINGS.get(method, {})
    pre, _ = one_step(natgrad.METHODS[method], model, x, y, kl_clip=None, **settings)
    before = {n: t.clone() for n, t in pre.grad_matrices().items()}
    state = pre.state_dict()
    V = {n: torch.randn_like(t) for n, t in before.items()}
    out = pre.precondition(V)
    for n in before:
        torch.testing.assert_close(pre.grad_matrices()[n], before[n], rtol=0, atol=0)
        assert not torch.equal(out[n], V[n])
    assert pre.state_dict()["steps"] == state["steps"]
    with pytest.raises(KeyError, match="not a preconditioned layer"):
        pre.precondition({"nope": torch.zeros(1)})
