"""Training outcome of each paper reading (docs/math.md §9): SKFAC's factor scale, EKFAC's
re-scaling rule and Sherman–Morrison K-FAC's rank-one phase, on real data.

For each method it trains the same model from the same seed on the same batches once per
reading, the readings interleaved (round robin over seeds), and reports the mean training
loss of the last 50 steps and the test accuracy after the budget. Behind SGD-momentum at
lr 0.05 with natgrad bench's settings for the family (damping 0.1, KL clip 1e-3) unless
``--damping``/``--kl-clip`` say otherwise. SM-K-FAC runs with ``T_cov = 1``, ``T_inv = 10``
(``k = 10``) so that its rank-one phase starts within the budget.

Usage: ``python benchmarks/readings.py [--dataset fashion-mnist|digits] [--steps 300]
[--seeds 1] [--methods skfac,ekfac,smkfac] [--damping 0.1] [--kl-clip 1e-3] [--json]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import natgrad
from natgrad.experiments.data import digits, fashion_mnist
from natgrad.experiments.models import fmnist_cnn

#: method → (config field, its readings, extra settings).
READINGS: dict[str, tuple[str, tuple[str, ...], dict]] = {
    "skfac": ("reading", ("kfc", "algorithm2"), {}),
    "ekfac": ("scale_rule", ("running", "batch"), {}),
    "smkfac": ("reading", ("chained", "paper"), {"T_cov": 1, "T_inv": 10, "k": 10}),
}


def run(method, field, reading, data, seed, steps, batch, hp):
    """Train once; return the record of this run."""
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = fmnist_cnn(x_train.shape[1], 10, x_train.shape[-1])
    pre, opt = natgrad.build(method, model, lr=0.05, **hp, **{field: reading})
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / len(y_train)) + 1
    order = torch.cat([torch.randperm(len(y_train), generator=gen) for _ in range(epochs)])
    losses, start = [], time.perf_counter()
    for s in range(steps):
        idx = order[s * batch : (s + 1) * batch]
        opt.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        correct = sum(
            (model(x_test[i : i + 1000]).argmax(1) == y_test[i : i + 1000]).sum().item()
            for i in range(0, len(y_test), 1000)
        )
    tail = losses[-50:]
    return {
        "method": method,
        field: reading,
        "seed": seed,
        "train_loss_last50": sum(tail) / len(tail) if all(map(math.isfinite, tail)) else None,
        "test_accuracy": correct / len(y_test),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--methods", default="skfac,ekfac,smkfac")
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--kl-clip", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in READINGS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; known: {', '.join(READINGS)}")
    torch.set_num_threads(args.threads)
    train, test = (fashion_mnist if args.dataset == "fashion-mnist" else digits)()
    data = (train.tensors, test.tensors)
    records = []
    for method in methods:
        field, readings, extra = READINGS[method]
        hp = {"damping": args.damping, "kl_clip": args.kl_clip, **extra}
        for seed in range(args.seeds):
            for reading in readings:  # interleaved: the machine's load hits both alike
                record = run(method, field, reading, data, seed, args.steps, args.batch, hp)
                records.append(record)
                if not args.json:
                    print(json.dumps(record), file=sys.stderr)
    out = {"dataset": args.dataset, "steps": args.steps, "batch": args.batch,
           "damping": args.damping, "kl_clip": args.kl_clip, "runs": records}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
