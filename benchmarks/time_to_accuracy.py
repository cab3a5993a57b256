"""Time to test accuracy on the Fashion-MNIST CNN, every method on its own clock, interleaved.

All runs train the same CNN (conv 1→32 5×5, pool; conv 32→64 5×5, pool; linear 3136→256;
linear 256→10) from the same initial weights on the same batches (batch 128, one
shuffled order per epoch, seed 0). They take turns in one process: each run does a chunk
of ``--chunk`` steps, then the next run does its chunk, and so on. Each run's clock counts
only its own training steps (forward, backward, preconditioner, optimizer), so a busy
machine slows every run alike instead of whichever happened to be running. Test accuracy
(the full 10,000-image test set, off the clock) is measured every ``--eval-every`` steps;
the time to each target is the training-clock time at the first evaluation at or above it.

A run is a spec ``name[:key=value,...]``:

* ``sgd``, ``adam`` … (:data:`natgrad.UPDATE_RULES`), ``kfac+adam`` … (any
  :func:`natgrad.build` spec): keys ``lr`` and ``weight_decay`` go to the optimizer, the
  others to the method (``damping=0.1,kl_clip=null``); without ``lr`` the build's default;
* ``soap``: heavyball's SOAP with its own defaults (lr 3e-3), keys go to its constructor.

Values are JSON (``null``, ``true``, numbers) or plain strings. A run stops at the last
target or at ``--epochs``; with ``--full`` every run trains all ``--epochs`` (the runs that
stop early leave the others a machine with less work on it, which flatters their clocks).

Usage::

    python benchmarks/time_to_accuracy.py --runs sgd:lr=0.05 adam:lr=1e-3 soap kfac \
        [--epochs 1] [--targets 88,90] [--chunk 10] [--eval-every 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.experiments.data import ImageData, load_fashion_mnist
from natgrad.experiments.models import fmnist_cnn

#: Builders for runs that are not :func:`natgrad.build` specs: ``(model, **kwargs) →
#: (preconditioner or None, optimizer)``. Scripts may add entries before calling
#: :func:`main`.
BUILDERS: dict[str, Callable[..., tuple[object | None, torch.optim.Optimizer]]] = {}


def _soap(model: nn.Module, **kwargs):
    from natgrad.experiments.peers import build_peer

    lr = kwargs.pop("lr", 3e-3)
    return None, build_peer("soap", model.parameters(), lr=lr, **kwargs)


BUILDERS["soap"] = _soap


def parse_run(text: str) -> tuple[str, dict]:
    """``"kfac+sgd:lr=0.05,kl_clip=null"`` → ``("kfac+sgd", {"lr": 0.05, "kl_clip": None})``."""
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"run {text!r}: expected key=value, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def build_run(name: str, kwargs: dict, model: nn.Module):
    if name in BUILDERS:
        return BUILDERS[name](model, **kwargs)
    return natgrad.build(name, model, **kwargs)


@dataclass
class Run:
    """One method's training run with its own clock."""

    label: str
    model: nn.Module
    preconditioner: object | None
    optimizer: torch.optim.Optimizer
    steps: int = 0
    seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    reached: dict[float, dict] = field(default_factory=dict)
    diverged: bool = False

    def train(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in batches:
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            if self.preconditioner is not None:
                self.preconditioner.step()
            self.optimizer.step()
            self.seconds += time.perf_counter() - t0
            self.steps += 1
            value = loss.item()
            self.losses.append(value)
            if not math.isfinite(value):
                self.diverged = True
                return


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, size: int, batch_size: int = 2000
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (0–1) on the first ``size`` test images."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, size, batch_size):
        x, y = data.test_batch(torch.arange(start, min(size, start + batch_size)))
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
    model.train()
    return loss_sum / size, correct / size


def batch_order(data: ImageData, batch_size: int, epochs: float, seed: int) -> list[torch.Tensor]:
    """Indices of every batch: one shuffled order per epoch (full batches only)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    per_epoch = n // batch_size
    total = math.ceil(epochs * per_epoch)
    out: list[torch.Tensor] = []
    while len(out) < total:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
    return out[:total]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", required=True, help="run specs (see above)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--targets", default="88,90", help="test accuracies in %%")
    parser.add_argument("--chunk", type=int, default=10, help="steps per turn")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-from", type=int, default=0, help="first step evaluated")
    parser.add_argument("--test-size", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--full", action="store_true",
                        help="every run trains all --epochs, also past its last target (a "
                        "run that stops early leaves the others a quieter machine)")
    args = parser.parse_args(argv)
    if args.eval_every % args.chunk:
        parser.error("--eval-every must be a multiple of --chunk")
    torch.set_num_threads(args.threads)
    targets = sorted(float(t) for t in args.targets.split(","))
    data = load_fashion_mnist()
    order = batch_order(data, args.batch_size, args.epochs, args.seed)

    runs: list[Run] = []
    for text in args.runs:
        name, kwargs = parse_run(text)
        torch.manual_seed(args.seed)
        model = fmnist_cnn()
        pre, opt = build_run(name, dict(kwargs), model)
        runs.append(Run(text, model, pre, opt))

    active = list(runs)
    start = 0
    while active and start < len(order):
        chunk = [data.train_batch(i) for i in order[start:start + args.chunk]]
        start += len(chunk)
        for run in list(active):
            run.train(chunk)
            done = run.diverged
            due = run.steps % args.eval_every == 0 and run.steps >= args.eval_from
            if due or start >= len(order):
                loss, acc = evaluate(run.model, data, min(args.test_size, len(data.y_test)))
                record = {"step": run.steps, "seconds": run.seconds, "test_acc": 100 * acc,
                          "test_loss": loss,
                          "train_loss": sum(run.losses[-len(chunk):]) / len(chunk)}
                run.evals.append(record)
                for t in targets:
                    if t not in run.reached and record["test_acc"] >= t:
                        run.reached[t] = {"step": run.steps, "seconds": run.seconds}
                done = done or (len(run.reached) == len(targets) and not args.full)
                if not args.quiet:
                    print(f"{run.label:<40} step {run.steps:4d} {run.seconds:7.1f}s "
                          f"acc {record['test_acc']:.2f} loss {record['train_loss']:.3f}",
                          file=sys.stderr, flush=True)
            if done:
                active.remove(run)

    report = {
        "model": "fmnist_cnn", "batch_size": args.batch_size, "threads": args.threads,
        "epochs": args.epochs, "chunk": args.chunk, "eval_every": args.eval_every,
        "seed": args.seed, "targets": targets, "test_size": args.test_size,
        "runs": {
            r.label: {
                "steps": r.steps,
                "ms_per_step": 1e3 * r.seconds / max(r.steps, 1),
                "diverged": r.diverged,
                "reached": {f"{t:g}": r.reached.get(t) for t in targets},
                "evals": r.evals,
            }
            for r in runs
        },
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'run':<40} {'ms/step':>8} " + " ".join(f"{'t→' + format(t, 'g') + '%':>14}"
                                                   for t in targets))
    for r in runs:
        cells = []
        for t in targets:
            hit = r.reached.get(t)
            cells.append(f"{hit['seconds']:7.1f}s/{hit['step']:4d}" if hit else f"{'—':>14}")
        print(f"{r.label:<40} {1e3 * r.seconds / max(r.steps, 1):8.1f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
