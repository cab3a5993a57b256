"""state_dict format and its checks (resuming bit-identically, for every method:
test_contract.py)."""

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
