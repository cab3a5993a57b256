"""What the hooks record in real training loops: gradient accumulation, evaluation and
input-gradient passes, passes no backward follows, paused recording, model copies and
pickles, sequence-first inputs. Each compares against the rows/factors of the plain
full-batch step computed the same way, in float64."""

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_cnn
from torch import nn

import natgrad
from natgrad.batching import resolve_batch_dims
from natgrad.capture import LayerCapture
from natgrad.layers import handler_for

pytestmark = pytest.mark.usefixtures("float64")


def watch(model, *names, **kwargs):
    modules = dict(model.named_modules())
    return LayerCapture({n: (modules[n], handler_for(modules[n])) for n in names}, "mean", **kwargs)


def cnn_and_batch(m=12):
    torch.manual_seed(0)
    model = digits_cnn().double()
    x, y = torch.randn(m, 1, 8, 8), torch.randint(0, 10, (m,))
    return model, x, y


def full_batch_factors(model, x, y):
    twin = copy.deepcopy(model)
    pre = natgrad.KFAC(twin, kl_clip=None)
    F.cross_entropy(twin(x), y).backward()
    pre.step()
    return pre.factors()


def assert_factors_equal(got, want):
    assert set(got) == set(want)
    for name in want:
        for mine, ref in zip(got[name], want[name]):
            torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("n", [2, 4])
def test_micro_batches_give_the_full_batch_factors(n):
    model, x, y = cnn_and_batch()
    want = full_batch_factors(model, x, y)
    pre = natgrad.KFAC(model, kl_clip=None)
    for xs, ys in zip(x.chunk(n), y.chunk(n)):
        (F.cross_entropy(model(xs), ys) / n).backward()
    pre.step()
    assert_factors_equal(pre.factors(), want)


def test_one_loss_over_two_forward_passes_gives_the_full_batch_factors():
    model, x, y = cnn_and_batch()
    want = full_batch_factors(model, x, y)
    pre = natgrad.KFAC(model, kl_clip=None)
    out = torch.cat([model(x[:5]), model(x[5:])])
    F.cross_entropy(out, y).backward()
    pre.step()
    assert_factors_equal(pre.factors(), want)


def test_accumulated_rows_are_the_full_batch_rows():
    """What every method receives (per-sample rows, not only A and G) is the full batch's."""
    model, x, y = cnn_and_batch()
    cap = watch(model, "0", "3", root=model)
    F.cross_entropy(model(x), y).backward()
    want = cap.pop()
    model.zero_grad()
    for xs, ys in zip(x.chunk(3), y.chunk(3)):
        (F.cross_entropy(model(xs), ys) / 3).backward()
    got = cap.pop()
    for name in want:
        torch.testing.assert_close(got[name].a, want[name].a, rtol=0, atol=0)
        torch.testing.assert_close(got[name].g, want[name].g, rtol=1e-12, atol=1e-15)


def test_tied_layer_uses_are_positions_of_the_same_samples():
    """A Linear applied twice in one forward pass of the model has the rows of the same
    Linear applied once to the two inputs stacked along a position dimension."""
    torch.manual_seed(1)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 3)
            self.shared = nn.Linear(3, 3)

        def forward(self, x, stacked=False):
            h = torch.tanh(self.inp(x))
            if stacked:
                both = self.shared(torch.stack([h, h.flip(1)], 1))
                return both[:, 0] + both[:, 1]
            return self.shared(h) + self.shared(h.flip(1))

    model = Tied()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    cap = watch(model, "shared", root=model)
    F.cross_entropy(model(x, stacked=True), y).backward()
    want = cap.pop()["shared"]
    F.cross_entropy(model(x), y).backward()
    got = cap.pop()["shared"]
    assert got.a.shape == want.a.shape == (6, 2, 4)
    torch.testing.assert_close(got.a, want.a, rtol=0, atol=0)
    torch.testing.assert_close(got.g, want.g, rtol=1e-12, atol=1e-15)


def test_micro_batches_of_other_lengths_are_a_clear_error():
    lin = nn.Linear(3, 2)
    cap = watch(lin, "")
    for t in (4, 5):
        lin(torch.randn(2, t, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"layer '': .*\(2, 4, 4\), \(2, 5, 4\).*positions"):
        cap.pop()


# --------------------------------------------------------------------- what is recorded
def held_copies(t):
    """How many tensors other than ``t`` itself share its storage (what a capture keeps)."""
    gc.collect()
    ptr = t.untyped_storage().data_ptr()
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return sum(1 for o in tensors if o is not t and o.untyped_storage().data_ptr() == ptr)


def test_evaluation_and_no_grad_passes_are_not_recorded():
    model, x, y = cnn_and_batch()
    want = full_batch_factors(model, x, y)
    pre = natgrad.KFAC(model, kl_clip=None)
    other = torch.randn(7, 1, 8, 8)
    model.eval()
    F.cross_entropy(model(other), y[:7]).backward()  # eval mode, grad enabled: a backward too
    model.train()
    with torch.no_grad():
        model(other)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert_factors_equal(pre.factors(), want)


def test_input_gradient_passes_are_not_recorded():
    """An adversarial-example step (gradient w.r.t. the input only) adds nothing."""
    model, x, y = cnn_and_batch()
    want = full_batch_factors(model, x, y)
    pre = natgrad.KFAC(model, kl_clip=None)
    x_adv = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    (grad_x,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
    F.cross_entropy(model(x_adv), y).backward(inputs=[x_adv])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert grad_x.abs().sum() > 0
    assert_factors_equal(pre.factors(), want)


def test_a_pass_no_backward_follows_is_freed_with_its_graph():
    model, x, y = cnn_and_batch()
    pre = natgrad.KFAC(model, kl_clip=None)
    stray = torch.randn(5, 1, 8, 8)
    out = model(stray)  # training mode, grad enabled, no backward
    assert held_copies(stray) >= 1  # autograd keeps it for the weight gradient
    del out
    assert held_copies(stray) == 0
    want = full_batch_factors(model, x, y)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert_factors_equal(pre.factors(), want)


def test_a_never_stepped_preconditioner_holds_one_batch():
    """zero_grad without a preconditioner step drops the passes that gradient explained."""
    model, _, _ = cnn_and_batch()
    pre = natgrad.KFAC(model, kl_clip=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(4)]
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert [held_copies(x) for x, _ in batches] == [0, 0, 0, 1]
    pre.step()  # the last batch, alone
    assert_factors_equal(pre.factors(), full_batch_factors(model, *batches[-1]))


def test_paused_recording():
    model, x, y = cnn_and_batch()
    cap = watch(model, "0", "3")
    with cap.paused():
        F.cross_entropy(model(x), y).backward()
    assert cap.pop() == {}
    out = model(x)
    with cap.paused():  # a recorded forward whose backward comes while paused
        F.cross_entropy(out, y).backward()
    assert cap.pop() == {}
    F.cross_entropy(model(x), y).backward()
    assert set(cap.pop()) == {"0", "3"}


def test_frozen_layers_are_not_recorded():
    model, x, y = cnn_and_batch()
    model[0].requires_grad_(False)
    cap = watch(model, "0", "3")
    F.cross_entropy(model(x.requires_grad_()), y).backward()
    assert set(cap.pop()) == {"3"}


def test_retained_graph_backward_passes_add_up_like_grad():
    torch.manual_seed(2)
    lin = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    cap = watch(lin, "")
    out = lin(x)
    out.pow(2).sum().div(5).backward(retain_graph=True)
    out.sin().sum().div(5).backward()
    g = cap.pop()[""].g
    torch.testing.assert_close(g[:, 0], (2 * out + out.cos()).detach(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------- copies and pickles
def test_a_deepcopy_of_the_model_never_feeds_the_original():
    model, x, y = cnn_and_batch()
    want = full_batch_factors(model, x, y)
    pre = natgrad.KFAC(model, kl_clip=None)
    ema = copy.deepcopy(model)
    for _ in range(3):
        F.cross_entropy(ema(torch.randn(9, 1, 8, 8)), y[:9]).backward()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert_factors_equal(pre.factors(), want)
    shallow = copy.copy(model)  # shares the hook objects
    F.cross_entropy(shallow(torch.randn(9, 1, 8, 8)), y[:9]).backward()
    assert pre._capture.pop() == {}


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_model_and_preconditioner_pickle():
    model, x, y = cnn_and_batch()
    pre = natgrad.KFAC(model, kl_clip=None)
    F.cross_entropy(model(x), y).backward()  # a pass recorded, not yet stepped
    loaded = roundtrip(model)
    F.cross_entropy(loaded(x), y).backward()  # a model loaded alone has inert hooks
    torch.testing.assert_close(loaded[3].weight.grad, model[3].weight.grad)
    roundtrip(pre)
    # Saved together, the loaded preconditioner records on the loaded model.
    both = roundtrip({"model": model, "pre": pre})
    model2, pre2 = both["model"], both["pre"]
    pre.step()
    model2.zero_grad()
    F.cross_entropy(model2(x), y).backward()
    pre2.step()
    assert_factors_equal(pre2.factors(), pre.factors())


# --------------------------------------------------------------------- batch dimension
def test_sequence_first_rows_equal_batch_first_rows():
    torch.manual_seed(3)
    lin = nn.Linear(4, 3)
    x, target = torch.randn(5, 6, 4), torch.randn(5, 6, 3)  # (M, T, d)
    first = watch(lin, "")
    F.mse_loss(lin(x), target).backward()
    want = first.pop()[""]
    first.remove()
    second = watch(lin, "", batch_dims={"": 1})
    F.mse_loss(lin(x.transpose(0, 1)), target.transpose(0, 1)).backward()
    got = second.pop()[""]
    torch.testing.assert_close(got.a, want.a, rtol=0, atol=0)
    torch.testing.assert_close(got.g, want.g, rtol=1e-12, atol=1e-15)


def test_transformer_layers_without_batch_first_read_dimension_1():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=False)
    model = nn.Sequential(layer, nn.Linear(8, 2))
    names = ["0.linear1", "0.linear2", "1"]
    assert resolve_batch_dims(model, names, None) == {"0.linear1": 1, "0.linear2": 1, "1": 0}
    assert resolve_batch_dims(model, names, {"1": 2})["1"] == 2
    assert resolve_batch_dims(model, names, 0) == dict.fromkeys(names, 0)
    batch_first = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    assert resolve_batch_dims(batch_first, ["linear1"], None) == {"linear1": 0}
    with pytest.raises(ValueError, match="batch_dim pattern 'head' matches no"):
        resolve_batch_dims(model, names, {"head": 1})
    with pytest.raises(ValueError, match="non-negative int .* got -1"):
        resolve_batch_dims(model, names, -1)


def test_a_batch_dim_beyond_the_input_is_a_clear_error():
    lin = nn.Linear(3, 2)
    cap = watch(lin, "", batch_dims={"": 2})  # noqa: F841 (hooks hold it weakly)
    with pytest.raises(ValueError, match=r"layer '': batch_dim=2 but its input has shape \(4, 3\)"):
        lin(torch.randn(4, 3))


# --------------------------------------------------------------------- through the preconditioner
def test_preconditioner_tied_layer_has_the_stacked_factors():
    torch.manual_seed(4)
    inp, shared = nn.Linear(4, 3), nn.Linear(3, 3)

    class Tied(nn.Module):
        def __init__(self, stacked):
            super().__init__()
            self.inp, self.shared, self.stacked = copy.deepcopy(inp), copy.deepcopy(shared), stacked

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            if self.stacked:
                both = self.shared(torch.stack([h, 2 * h], 1))
                return both[:, 0] * both[:, 1]
            return self.shared(h) * self.shared(2 * h)

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    factors = []
    for stacked in (True, False):
        model = Tied(stacked)
        pre = natgrad.KFAC(model, kl_clip=None)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        factors.append(pre.factors())
    assert_factors_equal(factors[1], factors[0])


def test_preconditioner_paused():
    model, x, y = cnn_and_batch()
    want = full_batch_factors(model, x, y)
    pre = natgrad.KFAC(model, kl_clip=None)
    with pre.paused():  # e.g. a consistency loss on another view, not training data
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), y[:4]).backward()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert_factors_equal(pre.factors(), want)


def test_sequence_first_transformer_has_the_batch_first_factors():
    torch.manual_seed(5)
    kwargs = dict(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0)
    first = nn.TransformerEncoderLayer(**kwargs, batch_first=True)
    seq = nn.TransformerEncoderLayer(**kwargs, batch_first=False)
    seq.load_state_dict(first.state_dict())
    x, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)  # (M, T, d)
    factors = []
    runs = ((first, x, target), (seq, x.transpose(0, 1), target.transpose(0, 1)))
    for model, inputs, targets in runs:
        with pytest.warns(natgrad.UnsupportedLayerWarning, match="out_proj"):
            pre = natgrad.KFAC(model, kl_clip=None)
        F.mse_loss(model(inputs), targets).backward()
        pre.step()
        factors.append(pre.factors())
    assert set(factors[0]) == {"linear1", "linear2"}
    assert_factors_equal(factors[1], factors[0])


def test_batch_dim_argument():
    lin = nn.Linear(4, 3)
    x, target = torch.randn(5, 6, 4), torch.randn(5, 6, 3)
    pre = natgrad.KFAC(lin, kl_clip=None)
    F.mse_loss(lin(x), target).backward()
    pre.step()
    want = pre.factors()
    pre.remove()
    lin.zero_grad()
    pre = natgrad.KFAC(lin, kl_clip=None, batch_dim=1)
    F.mse_loss(lin(x.transpose(0, 1)), target.transpose(0, 1)).backward()
    pre.step()
    assert_factors_equal(pre.factors(), want)
    with pytest.raises(ValueError, match=r"batch_dim=1 for layer '0' \(Conv2d\)"):
        natgrad.KFAC(digits_cnn(), batch_dim={"0": 1})


def test_mc_fisher_micro_batches_give_the_full_batch_factors(monkeypatch):
    """The sampled backward of each micro-batch records per-sample gradients (a summed
    loss), so accumulation needs no rescaling there either. Targets fixed to the argmax
    so that both runs sample the same labels."""
    monkeypatch.setattr(
        "natgrad.mc_fisher.sample_targets", lambda outputs, likelihood, gen: outputs.argmax(-1)
    )
    model, x, y = cnn_and_batch()
    factors = []
    for n in (1, 3):
        twin = copy.deepcopy(model)
        pre = natgrad.KFAC(twin, kl_clip=None, fisher="mc")
        for xs, ys in zip(x.chunk(n), y.chunk(n)):
            out = twin(xs)
            pre.sample_fisher(out)
            (F.cross_entropy(out, ys) / n).backward()
        pre.step()
        factors.append(pre.factors())
    assert_factors_equal(factors[1], factors[0])
