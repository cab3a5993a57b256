"""state_dict round-trips: resuming mid-cycle is bit-identical to an uninterrupted run."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.experiments.data import digits


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = natgrad.KFAC(model, opt, T_cov=3, T_inv=5, **kw)
    return model, opt, pre


def batches(n):
    train, _ = digits()
    x, y = train.tensors
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        idx = torch.randint(0, len(y), (32,), generator=g)
        yield x[idx], y[idx]


def train(model, opt, pre, data, mc=False):
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        if mc:
            pre.sample_fisher(out)
        F.cross_entropy(out, y).backward()
        pre.step()
        opt.step()


@pytest.mark.parametrize("kw", [{}, {"inverse": "eigen"}, {"fisher": "mc"}])
def test_resume_is_bit_identical(kw):
    mc = kw.get("fisher") == "mc"
    data = list(batches(17))
    model, opt, pre = make(**kw)
    train(model, opt, pre, data, mc)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt, pre = make(**kw)
    train(model, opt, pre, data[:8], mc)  # stop mid T_inv and mid T_cov cycle
    buffer = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "p": pre.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    model, opt, pre = make(seed=123, **kw)  # different init: everything must come from the file
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    pre.load_state_dict(saved["p"])
    train(model, opt, pre, data[8:], mc)
    for p, ref in zip(model.parameters(), reference):
        assert torch.equal(p, ref)


def test_load_rejects_mismatched_state():
    model, opt, pre = make()
    state = pre.state_dict()
    other = natgrad.KFAC(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="saved layers do not match"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="unsupported state version"):
        pre.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="saved by"):
        pre.load_state_dict({**state, "method": "EKFAC"})


def test_state_dict_is_plain_data_keyed_by_layer():
    model, opt, pre = make()
    x, y = next(batches(1))
    F.cross_entropy(model(x), y).backward()
    pre.step()
    state = pre.state_dict()
    assert set(state["layers"]) == {"0", "3"}
    assert set(state["layers"]["0"]["curvature"]) == {"A", "G"}
    assert set(state["layers"]["0"]["inverse"]) == {"A_inv", "G_inv"}
    assert state["config"]["T_inv"] == 5
