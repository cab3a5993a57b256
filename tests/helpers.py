"""Set-up shared by several test modules: tiny models and batches, one preconditioned
step, random layer statistics, a plain training loop, a resume round trip, a recorder of
tensor shapes, and running a function on spawned worker processes."""

from __future__ import annotations

import io
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import natgrad


def digits_cnn() -> nn.Module:
    """Conv 1→4 3×3 (padding 1), ReLU, linear 256→10, for 8×8 digits; seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    )


def digit_batches(n: int, size: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` float64 training batches of scikit-learn's digits, drawn with replacement."""
    from natgrad.experiments.data import digits

    x, y = digits()[0].tensors
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(y), (size,), generator=gen)
        out.append((x[idx].double(), y[idx]))
    return out


def tiny_cnn(kernel=3, stride=2, padding=1, dilation=1, bias=True, seed=None) -> nn.Module:
    """Conv 2→3 (``kernel``, ``stride``, …), Tanh, linear →4, for ``(M, 2, 7, 7)`` inputs
    (with the defaults also ``(M, 2, 8, 8)``); seeded with ``seed`` unless ``None``."""
    if seed is not None:
        torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    side = (7 + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * side * side, 4))


def tiny_mlp(bias=True) -> nn.Module:
    """Linear 6→5, Tanh, Linear 5→4, for ``(M, 6)`` inputs (not seeded)."""
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias))


def random_batch(model: nn.Module, m: int = 9, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` Gaussian inputs for ``tiny_mlp`` (``(m, 6)``) or ``tiny_cnn`` (``(m, 2, 7, 7)``),
    chosen by the model's first layer, and labels in 0…3; seeds the global generator."""
    torch.manual_seed(seed)
    x = torch.randn(m, 6) if isinstance(model[0], nn.Linear) else torch.randn(m, 2, 7, 7)
    return x, torch.randint(0, 4, (m,))


def conv_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Seven ``(2, 8, 8)`` Gaussian inputs for ``tiny_cnn`` and labels in 0…3 (seed 0)."""
    torch.manual_seed(0)
    return torch.randn(7, 2, 8, 8), torch.randint(0, 4, (7,))


def one_step(cls, model, x, y, **kw):
    """One ``cls`` step (SGD, lr 0.1; ``kl_clip=None`` unless given) on a cross-entropy
    backward of ``(x, y)``: the preconditioner and the gradient matrices before it."""
    pre = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), **{"kl_clip": None, **kw})
    F.cross_entropy(model(x), y).backward()
    grads = pre.grad_matrices()
    pre.step()
    return pre, grads


def random_stats(seed, m=7, p=3, d_in=5, d_out=4) -> natgrad.LayerStats:
    """Gaussian rows ``a`` ``(m, p, d_in)`` and ``g`` ``(m, p, d_out)``, seeded."""
    torch.manual_seed(seed)
    return natgrad.LayerStats(torch.randn(m, p, d_in), torch.randn(m, p, d_out))


def feed(curvatures, stats, decay) -> None:
    """The same statistics into several curvature estimates."""
    for c in curvatures:
        c.update(stats, decay)


def train(model, pre, opt, data, mc=False) -> list[float]:
    """zero_grad, cross-entropy backward, ``pre.step()`` (unless ``pre`` is ``None``),
    ``opt.step()`` per batch; the losses. ``mc``: ``pre.sample_fisher`` before backward."""
    losses = []
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        if mc:
            pre.sample_fisher(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_resume_bit_identical(fresh, data, cuts, restore=None) -> list[dict]:
    """``fresh()`` → a new ``(model, preconditioner, optimizer)``. Train one on all of
    ``data`` (the global random stream must stay untouched); then, for each ``cut``, train a
    new one on ``data[:cut]``, round-trip the three states through ``torch.save``, load them
    into a triple from ``restore()`` (default ``fresh``: e.g. one built with other settings,
    which the loaded state must override) and train it on the rest: its parameters must
    equal the uninterrupted run's bit for bit. Returns the saved states, one per cut."""
    model, pre, opt = fresh()
    state = torch.get_rng_state()
    train(model, pre, opt, data)
    assert torch.equal(torch.get_rng_state(), state)
    reference = [p.detach().clone() for p in model.parameters()]
    saves = []
    for cut in cuts:
        model, pre, opt = fresh()
        train(model, pre, opt, data[:cut])
        buffer = io.BytesIO()
        torch.save({"m": model.state_dict(), "o": opt.state_dict(), "p": pre.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        model, pre, opt = (restore or fresh)()
        model.load_state_dict(saved["m"])
        opt.load_state_dict(saved["o"])
        pre.load_state_dict(saved["p"])
        train(model, pre, opt, data[cut:])
        for p, ref in zip(model.parameters(), reference):
            assert torch.equal(p, ref)
        saves.append(saved)
    return saves


class ShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(fn, args: tuple, nprocs: int, deadline_s: float, what: str) -> None:
    """``fn(rank, *args)`` on ``nprocs`` spawned processes; fail the test (killing them)
    if they have not all finished after ``deadline_s`` seconds."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {deadline_s} s")
