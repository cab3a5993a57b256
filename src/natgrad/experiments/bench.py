"""``natgrad bench``: every method on one model and dataset, same seed, data order and
budget; then the table and the plots. ``natgrad report`` is :func:`write_report` alone.

Results folder layout::

    OUT/bench.json                  what was run (methods, hyperparameters, budget, targets)
    OUT/runs/<spec>/seed<k>/        meta.json, log.jsonl, checkpoint.pt (see train.py)
    OUT/results.md, OUT/results.csv the table
    OUT/plots/*.png                 test accuracy / training loss vs epochs and vs time
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import load
from .methods import MethodSpec
from .plots import write_plots
from .results import load_runs, markdown_table, summarise, write_csv
from .schedule import LRSchedule
from .train import RunConfig, train_run
from .workers import Workers

__all__ = ["BenchPlan", "run_bench", "write_report", "DEFAULT_TARGETS"]

#: Accuracy thresholds (0–1) used when ``--targets`` is not given, per dataset.
DEFAULT_TARGETS: dict[str, tuple[float, ...]] = {
    "fashion-mnist": (0.88, 0.90),
    "digits": (0.90, 0.95),
    "cifar10": (0.80, 0.90),
    "cifar100": (0.50, 0.60),
    "svhn": (0.90, 0.95),
}


@dataclass
class BenchPlan:
    """A resolved benchmark: what runs, with which settings."""

    dataset: str
    model: str
    methods: list[MethodSpec]
    hyperparameters: dict[str, dict[str, Any]]
    batch_size: int
    epochs: float | None
    minutes: float | None
    seeds: list[int]
    targets: list[float]
    schedule: LRSchedule = LRSchedule()
    evals_per_epoch: int = 2
    log_every: int = 10
    augment: bool | None = None
    data_dir: str | None = None
    device: str = "cpu"
    preset: str | None = None
    notes: list[str] = field(default_factory=list)
    processes: int = 1

    def run_config(self, spec: str, seed: int) -> RunConfig:
        return RunConfig(
            spec=spec, hyperparameters=self.hyperparameters[spec], dataset=self.dataset,
            model=self.model, batch_size=self.batch_size, epochs=self.epochs,
            minutes=self.minutes, seed=seed, evals_per_epoch=self.evals_per_epoch,
            log_every=self.log_every, schedule=self.schedule.as_dict(), augment=self.augment,
            device=self.device, processes=self.processes,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "model": self.model,
            "methods": [m.name for m in self.methods],
            "hyperparameters": self.hyperparameters, "batch_size": self.batch_size,
            "epochs": self.epochs, "minutes": self.minutes, "seeds": self.seeds,
            "targets": self.targets, "schedule": str(self.schedule),
            "evals_per_epoch": self.evals_per_epoch, "augment": self.augment,
            "device": self.device, "processes": self.processes,
            "preset": self.preset, "notes": self.notes,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(),
                        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        }


def run_bench(plan: BenchPlan, out: str | os.PathLike, *, resume: bool = False,
              progress: bool | None = None, quiet: bool = False,
              workers: Workers | None = None) -> str | None:
    """Run every method × seed of ``plan`` into ``out``; write and return the table.

    On several processes every worker calls this; rank 0 writes and returns the table,
    the others return ``None``.
    """
    workers = workers or Workers.single()
    out = Path(out)
    data = load(plan.dataset, plan.data_dir, plan.augment)
    speak = workers.is_main and not quiet
    if workers.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(plan.as_dict(), indent=2) + "\n")
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
    total = len(plan.seeds) * len(plan.methods)
    done = 0
    for seed in plan.seeds:
        for method in plan.methods:
            done += 1
            if speak:
                print(f"== run {done}/{total}: {method.name} (seed {seed})", file=sys.stderr)
            train_run(plan.run_config(method.name, seed), data,
                      out / "runs" / method.name / f"seed{seed}",
                      resume=resume, progress=progress, quiet=quiet, workers=workers)
    return write_report(out) if workers.is_main else None


def write_report(out: str | os.PathLike, targets: Sequence[float] | None = None) -> str:
    """Rebuild ``results.md``, ``results.csv`` and ``plots/`` from the saved runs in ``out``;
    return the Markdown table (with a header saying what was run).

    Raises:
        FileNotFoundError: no finished run under ``out/runs``.
    """
    out = Path(out)
    bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {}
    runs = load_runs(out)
    if not runs:
        raise FileNotFoundError(f"no runs under {out / 'runs'} (expected runs/<method>/seed<k>/)")
    if targets is None:
        targets = bench.get("targets") or DEFAULT_TARGETS.get(
            runs[0].meta["config"]["dataset"], (0.9,))
    order = bench.get("methods", [])
    rows = summarise(runs, targets, order)
    table = markdown_table(rows, targets)
    cfg = runs[0].meta["config"]
    budget = " and ".join(
        f"{v:g} {k}" for k, v in (("epochs", cfg["epochs"]), ("minutes", cfg["minutes"])) if v
    )
    seeds = sorted({r.seed for r in runs})
    processes = cfg.get("processes", 1)
    batch = f"batch {cfg['batch_size']}"
    if processes > 1:
        batch += f" ({cfg['batch_size'] // processes} on each of {processes} processes)"
    header = (
        f"# natgrad bench: {cfg['model']} on {cfg['dataset']}\n\n"
        f"Budget {budget} per run, {batch}, seeds {seeds}, "
        f"lr schedule {LRSchedule(**cfg['schedule'])}. Times are training-clock seconds "
        "(evaluation excluded) measured in this run on "
        f"{bench.get('machine', {}).get('platform', 'this machine')} "
        f"({_threads(bench)}{' per process' if processes > 1 else ''}, load average "
        f"{_load(bench)} at the start). Time to a threshold is "
        f"the first evaluation at or above it ({cfg['evals_per_epoch']} evaluations per "
        "epoch); ratios are to the fastest first-order baseline in this run.\n\n"
    )
    unfinished = sorted({f"{r.spec}/seed{r.seed}" for r in runs
                         if r.status not in ("done", "diverged")})
    if unfinished:
        header += f"Unfinished runs (not in the table): {', '.join(unfinished)}.\n\n"
    text = header + table
    (out / "results.md").write_text(text)
    write_csv(rows, targets, out / "results.csv")
    title = f"{cfg['model']} on {cfg['dataset']}"
    write_plots([r for r in runs if r.status in ("done", "diverged")], out / "plots", order,
                targets, title)
    return text


def _threads(bench: dict[str, Any]) -> str:
    threads = bench.get("machine", {}).get("threads", "?")
    return f"{threads} thread{'' if threads == 1 else 's'}"


def _load(bench: dict[str, Any]) -> str:
    load = bench.get("machine", {}).get("load_average")
    return "unknown" if not load else f"{load[0]:.1f}"
