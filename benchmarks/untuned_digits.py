"""Does every method train untuned? scikit-learn digits, MLP 64-64-10, batch 128.

Each run trains the same MLP (same initial weights, same batches: one shuffled order per
epoch, seed 0) for ``--steps`` steps. The baseline is SGD-momentum at lr 0.05; every
method runs as ``natgrad.build(name, model)`` builds it with nothing else (its recommended
update rule, learning rate and settings), or with the keyword arguments of its spec.
Printed per run: the mean training loss over the first and the last 10 steps, and a
verdict: ``ok`` (ends below the baseline's last-10 loss, never non-finite), ``behind``,
``diverged`` (a non-finite loss or last-10 above first-10) or ``stalled`` (last-10 above
90 % of first-10).

Usage: ``python benchmarks/untuned_digits.py [--runs kfac ekfac:damping=0.1 ...]
[--steps 100] [--json]`` (default runs: every method of ``natgrad.METHODS``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

import natgrad
from natgrad.experiments.data import load_digits
from natgrad.experiments.models import mlp

#: How a run is built from its spec (scripts may replace it to try variants).
BUILD = natgrad.build


def parse_run(text: str) -> tuple[str, dict]:
    """``"kfac:damping=0.1"`` → ``("kfac", {"damping": 0.1})`` (values are JSON or strings)."""
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def train(spec: str, kwargs: dict, steps: int, batch_size: int, seed: int) -> list[float]:
    """Training losses of ``steps`` steps of ``natgrad.build(spec, model, **kwargs)``."""
    data = load_digits()
    torch.manual_seed(seed)
    model = mlp(64, 10, hidden=(64, 64))
    pre, opt = BUILD(spec, model, **kwargs)
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    order: list[torch.Tensor] = []
    losses = []
    for _ in range(steps):
        if not order:
            perm = torch.randperm(n, generator=g)
            order = [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        x, y = data.train_batch(order.pop(0))
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    return losses


def verdict(losses: list[float], baseline: float | None, steps: int) -> str:
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    if len(losses) < steps or not math.isfinite(last) or last > first:
        return "diverged"
    if last > 0.9 * first:
        return "stalled"
    if baseline is not None and last >= baseline:
        return "behind"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", default=list(natgrad.METHODS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = train("sgd", {"lr": 0.05}, args.steps, args.batch_size, args.seed)
    baseline = sum(base[-10:]) / 10
    results = {"sgd:lr=0.05": {"first10": sum(base[:10]) / 10, "last10": baseline,
                               "verdict": verdict(base, None, args.steps)}}
    for text in args.runs:
        name, kwargs = parse_run(text)
        losses = train(name, kwargs, args.steps, args.batch_size, args.seed)
        results[text] = {
            "first10": sum(losses[:10]) / 10,
            "last10": sum(losses[-10:]) / 10,
            "verdict": verdict(losses, baseline, args.steps),
        }
    if args.json:
        print(json.dumps({"steps": args.steps, "batch_size": args.batch_size,
                          "seed": args.seed, "runs": results}))
        return 0
    for text, r in results.items():
        print(f"{text:<40} {r['first10']:7.3f} → {r['last10']:7.3f}  {r['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
