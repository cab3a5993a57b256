"""Step cost of every natgrad method relative to plain SGD, measured in one run.

On the Fashion-MNIST CNN (conv 1→32 5×5, pool; conv 32→64 5×5, pool; linear 3136→256;
linear 256→10), batch 128, 2 threads, it prints:

* SGD ms/iter (SGD-momentum, the baseline; timed before the methods and after each round
  of them, best block kept);
* per method: SGD-behind-the-method ms/iter amortized over one full ``T_inv`` cycle
  (each method's own schedule; K-FAC's ``T_cov = 10``, ``T_inv = 100``; with
  ``--repeats N``, the best of N cycles, interleaved with the SGD blocks, so that load
  from other processes — which only ever adds time — shows less), its ratio to that SGD
  figure (``× SGD``) and to a plain SGD twin stepped on the same batches, interleaved step
  by step with the method, over all its cycles (``× twin``: both under the same load, the
  steadier figure on a shared machine), and the split of that time into
  forward+backward (with capture hooks), row capture,
  curvature update, inverse update, preconditioning and the rest (KL clip, writes,
  optimizer);
* per layer: the time of one curvature (factor) update and one inverse update.

SM-KFAC switches to its cheap rank-one phase after ``k`` full inverse updates (``k = 10``
by default, i.e. after 1000 steps); so that the timed cycle is its steady state, it is
built with ``k = 1`` here (override with ``--set smkfac.k=10``).

Usage: ``python benchmarks/step_overhead.py [--methods kfac,ekfac] [--repeats N]
[--set m.field=v] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import natgrad
from natgrad.capture import LayerCapture
from natgrad.experiments.data import DatasetMissing, fashion_mnist
from natgrad.experiments.models import fmnist_cnn

#: Build each method with ``natgrad.build(name, model)``'s recommended pairing
#: (``--recommended``) instead of behind SGD-momentum at ``--lr``.
RECOMMENDED = False
#: Where models and batches live (``--device``).
DEVICE = torch.device("cpu")


def _now() -> float:
    """Wall time, after the device's queued work is done (CUDA runs asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def batches(n: int, batch_size: int, seed: int = 0):
    """Real Fashion-MNIST batches when the files are there, else random ones of its shape."""
    g = torch.Generator().manual_seed(seed)
    try:
        x, y = fashion_mnist()[0].tensors
    except DatasetMissing:
        x, y = (
            torch.randn(batch_size * 8, 1, 28, 28, generator=g),
            torch.randint(0, 10, (batch_size * 8,), generator=g),
        )
    for _ in range(n):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        yield x[idx].to(DEVICE), y[idx].to(DEVICE)


class Split:
    """Accumulates wall time per phase by wrapping methods of the classes that do the work."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        original = getattr(owner, attr)
        seconds = self.seconds

        def timed(*args, **kwargs):
            t0 = _now()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[phase] += _now() - t0

        self._patches.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()


def time_sgd(data, steps: int, lr: float) -> float:
    torch.manual_seed(0)
    model = fmnist_cnn().to(DEVICE)
    _, opt = natgrad.build("sgd", model, lr=lr)
    return _loop(model, None, opt, data, steps, warmup=5)[0]


def _loop(model, pre, opt, data, steps, warmup, split: Split | None = None, twin=None):
    """Train ``steps`` timed steps (after ``warmup``); ms/iter and the last loss.

    ``twin``: a ``(model, optimizer)`` pair of plain SGD-momentum stepped on the same batch
    right after every timed step, so that both see the same load from other processes;
    its ms/iter is returned third (its time is not counted in the first).
    """
    it = iter(data)
    twin_seconds = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = _now()
            twin_seconds = 0.0
            if split is not None:
                split.seconds.clear()
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        if split is not None:
            tf = _now()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if split is not None:
            split.seconds["forward+backward"] += _now() - tf
        if pre is not None:
            pre.step()
        opt.step()
        if twin is not None and i >= warmup:
            tt = _now()
            twin_model, twin_opt = twin
            twin_opt.zero_grad(set_to_none=True)
            F.cross_entropy(twin_model(x), y).backward()
            twin_opt.step()
            twin_seconds += _now() - tt
    total = _now() - t0 - twin_seconds
    return total / steps * 1e3, loss.item(), twin_seconds / steps * 1e3


#: Per-method settings that make one warm-up cycle reach the method's steady state.
STEADY_STATE = {"smkfac": {"k": 1}}


def method_cycles(name: str, data, lr: float, overrides: dict):
    """Build ``name`` behind SGD-momentum, warm it up, then time one cycle per ``next``.

    The first item is ``{"pre", "model"}`` (for the per-layer costs); every later one holds
    ``ms_per_iter``, ``split_ms_per_iter`` and ``final_loss`` of one full ``T_inv`` cycle,
    and ``paired_sgd_ms_per_iter``: a plain SGD-momentum twin stepped on the same batches,
    interleaved step by step, so that the ratio of the two is measured under one load.
    """
    torch.manual_seed(0)
    model = fmnist_cnn().to(DEVICE)
    if RECOMMENDED:
        pre, opt = natgrad.build(name, model, **overrides)
    else:
        pre, opt = natgrad.build(f"{name}+sgd", model, lr=lr, **overrides)
    cycle = pre.config.T_inv
    # Warm up through a full cycle first, so that every timed cycle is a steady-state one
    # that starts with an inverse update (step T_inv) like every later cycle.
    _loop(model, pre, opt, data, cycle, warmup=0)
    layer = next(iter(pre.layers.values()))
    torch.manual_seed(0)
    twin_model = fmnist_cnn().to(DEVICE).to(DEVICE)
    twin = (twin_model, natgrad.build("sgd", twin_model, lr=lr)[1])
    _loop(twin_model, None, twin[1], data, 5, warmup=0)
    yield {"pre": pre, "model": model}
    while True:
        split = Split()
        split.wrap(LayerCapture, "pop", "capture")
        split.wrap(type(layer.curvature), "update", "curvature update")
        split.wrap(type(layer.inverse), "refresh", "inverse update")
        split.wrap(type(layer.inverse), "observe", "inverse observe")
        split.wrap(type(layer.inverse), "apply", "preconditioning")
        try:
            ms, loss, sgd_ms = _loop(model, pre, opt, data, cycle, warmup=0, split=split, twin=twin)
        finally:
            split.restore()
        accounted = sum(split.seconds.values())
        phases = {k: v / cycle * 1e3 for k, v in split.seconds.items() if v > 0}
        phases["rest (clip, writes, optimizer)"] = max(0.0, ms - accounted / cycle * 1e3)
        yield {
            "ms_per_iter": ms,
            "paired_sgd_ms_per_iter": sgd_ms,
            "split_ms_per_iter": phases,
            "final_loss": loss,
        }


def per_layer_costs(pre, model, data, repeats: int = 3) -> dict:
    """One curvature update and one inverse update per layer, best of ``repeats``."""
    x, y = next(iter(data))
    pre._capture.active = True
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    stats = pre._capture.pop()
    out = {}
    for name, layer in pre.layers.items():
        cur = layer.curvature
        state = cur.state_dict()
        t_cov = _best(lambda: cur.update(stats[name], pre.config.decay), repeats)
        cur.load_state_dict(state)
        damping = pre.layer_dampings()[name]
        inv_state = layer.inverse.state_dict()
        t_inv = _best(lambda: layer.inverse.refresh(cur, damping), repeats)
        layer.inverse.load_state_dict(inv_state)
        d_out, d_in = layer.handler.shape(layer.module)
        out[name] = {"shape": f"{d_out}x{d_in}", "curvature_update": t_cov, "inverse_update": t_inv}
    pre._capture.active = pre._wants_stats(pre.steps)
    return out


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = _now()
        fn()
        times.append((_now() - t0) * 1e3)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", default=",".join(natgrad.METHODS), help="comma-separated method names"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--recommended", action="store_true",
        help="time each method as natgrad.build(name, model) pairs it (quadratic-model "
        "step, Levenberg-Marquardt damping, warm start, plain SGD) instead of behind "
        "SGD-momentum at --lr",
    )
    parser.add_argument("--sgd-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="timed cycles per method (and SGD blocks + 1), interleaved; the best is kept",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a method hyperparameter for this run (repeatable), e.g. smkfac.k=10",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE, RECOMMENDED
    DEVICE, RECOMMENDED = torch.device(args.device), args.recommended
    if args.repeats < 1:
        parser.error(f"--repeats: must be at least 1, got {args.repeats}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in natgrad.METHODS:
            parser.error(f"--methods: unknown method {m!r}; known: {', '.join(natgrad.METHODS)}")

    overrides = {m: dict(STEADY_STATE.get(m, {})) for m in methods}
    for item in args.set:
        try:
            key, value = item.split("=", 1)
            method, field = key.split(".", 1)
        except ValueError:
            parser.error(f"--set: expected METHOD.FIELD=VALUE, got {item!r}")
        if method not in overrides:
            parser.error(f"--set: method {method!r} is not among --methods")
        overrides[method][field] = json.loads(value) if value[:1].isdigit() or value in (
            "true", "false", "null") else value

    def data():
        return batches(10**6, args.batch_size)

    # SGD blocks and method cycles interleave (SGD, every method, SGD, ...) and each
    # figure is the best of its repeats: load from other processes only ever adds time.
    runs = {m: method_cycles(m, data(), args.lr, overrides[m]) for m in methods}
    built = {m: next(run) for m, run in runs.items()}
    sgd_blocks = [time_sgd(data(), args.sgd_steps, args.lr)]
    cycles: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            cycles[m].append(next(runs[m]))
        sgd_blocks.append(time_sgd(data(), args.sgd_steps, args.lr))
    sgd = min(sgd_blocks)
    results = {}
    for m in methods:
        best = min(cycles[m], key=lambda c: c["ms_per_iter"])
        pre = built[m]["pre"]
        paired = sum(c["ms_per_iter"] for c in cycles[m]) / sum(
            c["paired_sgd_ms_per_iter"] for c in cycles[m]
        )
        results[m] = {
            **best,
            "ms_per_iter_cycles": [c["ms_per_iter"] for c in cycles[m]],
            "paired_sgd_ms_per_iter_cycles": [c["paired_sgd_ms_per_iter"] for c in cycles[m]],
            "ratio_to_sgd": best["ms_per_iter"] / sgd,
            "ratio_to_paired_sgd": paired,
            "cycle_steps": pre.config.T_inv,
            "T_cov": pre.config.T_cov,
            "T_inv": pre.config.T_inv,
            "per_layer_ms": per_layer_costs(pre, built[m]["model"], data()),
            "overrides": overrides[m],
        }
        if not args.json:
            print(f"timed {m}", file=sys.stderr)
    report = {
        "model": "fmnist_cnn",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "device": args.device,
        "recommended": args.recommended,
        "sgd_ms_per_iter": sgd,
        "sgd_ms_per_iter_blocks": sgd_blocks,
        "methods": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    blocks = ", ".join(f"{b:.1f}" for b in sgd_blocks)
    print(
        f"SGD-momentum: {sgd:.1f} ms/iter (best of {blocks}); "
        f"batch {args.batch_size}, {args.threads} threads, best of {args.repeats} cycle(s)"
    )
    print(
        f"\n{'method':<8} {'T_cov/T_inv':>11} {'ms/iter':>8} {'× SGD':>6} {'× twin':>6}"
        "   split (ms/iter, amortized)"
    )
    for m, r in results.items():
        split = ", ".join(f"{k} {v:.1f}" for k, v in r["split_ms_per_iter"].items())
        print(
            f"{m:<8} {r['T_cov']:>5}/{r['T_inv']:<5} {r['ms_per_iter']:>8.1f} "
            f"{r['ratio_to_sgd']:>6.2f} {r['ratio_to_paired_sgd']:>6.2f}   {split}"
        )
    print("× twin: against a plain SGD twin stepped on the same batches, interleaved step by step")
    print("\nper layer: one curvature update / one inverse update (ms)")
    for m, r in results.items():
        cells = "; ".join(
            f"{n} [{c['shape']}] {c['curvature_update']:.1f} / {c['inverse_update']:.1f}"
            for n, c in r["per_layer_ms"].items()
        )
        print(f"{m:<8} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
