"""``natgrad bench``: every method on one model and dataset, same seed, data order and
budget; then the table and the plots. ``natgrad report`` is :func:`write_report` alone.

Results folder layout (one experiment per folder)::

    OUT/bench.json                  what was run (methods, hyperparameters, budget, targets)
    OUT/.lock                       while a run writes the folder: its pid, host, start time
    OUT/runs/<spec>/seed<k>/        meta.json, log.jsonl, checkpoint.pt (see train.py)
    OUT/results.md, OUT/results.csv the table
    OUT/plots/*.png                 test accuracy / training loss vs epochs and vs time
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import files
from .data import load, shape_of
from .methods import MethodSpec
from .models import build_model
from .plots import write_plots
from .results import (
    consistent_runs,
    fallback_notes,
    load_runs,
    markdown_table,
    summarise,
    write_csv,
)
from .schedule import LRSchedule
from .train import RunConfig, train_runs
from .workers import Workers

__all__ = ["BenchPlan", "run_bench", "write_report", "DEFAULT_TARGETS", "DEFAULT_INTERLEAVE",
           "ExperimentMismatch"]

#: Accuracy thresholds (0–1) used when ``--targets`` is not given, per dataset.
DEFAULT_TARGETS: dict[str, tuple[float, ...]] = {
    "fashion-mnist": (0.88, 0.90),
    "digits": (0.90, 0.95),
    "cifar10": (0.80, 0.90),
    "cifar100": (0.50, 0.60),
    "svhn": (0.90, 0.95),
}
#: Steps per turn when the methods of a bench take turns in one process (``--interleave``).
DEFAULT_INTERLEAVE = 10
#: ``bench.json`` entries that make two plans the same experiment (the rest, such as the
#: targets, the interleaving or the machine, only change how it is run or reported).
IDENTITY = ("dataset", "model", "methods", "hyperparameters", "batch_size", "epochs",
            "minutes", "seeds", "schedule", "evals_per_epoch", "log_every", "augment",
            "device", "processes")
#: What a results folder holds of an experiment (``--fresh`` removes exactly these).
_EXPERIMENT_FILES = ("bench.json", "results.md", "results.csv", "runs", "plots")


class ExperimentMismatch(ValueError):
    """The results folder holds another experiment."""


@dataclass
class BenchPlan:
    """A resolved benchmark: what runs, with which settings.

    ``interleave``: steps per turn when the methods take turns in one process (``None``:
    one method after another); it changes nothing but the wall-clock order.
    """

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
    interleave: int | None = DEFAULT_INTERLEAVE

    def run_config(self, spec: str, seed: int) -> RunConfig:
        return RunConfig(
            spec=spec, hyperparameters=self.hyperparameters[spec], dataset=self.dataset,
            model=self.model, batch_size=self.batch_size, epochs=self.epochs,
            minutes=self.minutes, seed=seed, evals_per_epoch=self.evals_per_epoch,
            log_every=self.log_every, schedule=self.schedule.as_dict(), augment=self.augment,
            device=self.device, processes=self.processes,
        )

    def validate(self) -> None:
        """Build every run's configuration and every method's preconditioner and optimizer
        (on the model, without data) so that a bad value fails now, before anything is
        written or trained, with the method's name.

        Raises:
            ValueError: the first bad setting, naming the method and the value.
        """
        for seed in self.seeds:
            for m in self.methods:
                self.run_config(m.name, seed)
        if self.interleave is not None and (not isinstance(self.interleave, int)
                                            or self.interleave < 1):
            raise ValueError(f"--interleave must be an integer >= 0, got {self.interleave!r}")
        torch.manual_seed(0)
        net = build_model(self.model, *shape_of(self.dataset))
        for m in self.methods:
            hp = self.hyperparameters[m.name]
            m.check(hp)
            try:
                pre, _ = m.build(net, hp, seed=self.seeds[0])
            except (ValueError, TypeError, RuntimeError) as e:
                raise ValueError(f"{m.name}: {e} (its settings: {_settings_text(hp)})"
                                 ) from None
            if pre is not None:
                pre.remove()

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "model": self.model,
            "methods": [m.name for m in self.methods],
            "hyperparameters": self.hyperparameters, "batch_size": self.batch_size,
            "epochs": self.epochs, "minutes": self.minutes, "seeds": self.seeds,
            "targets": self.targets, "schedule": str(self.schedule),
            "evals_per_epoch": self.evals_per_epoch, "log_every": self.log_every,
            "augment": self.augment, "device": self.device, "processes": self.processes,
            "interleave": self.interleave, "preset": self.preset, "notes": self.notes,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(),
                        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        }


def _settings_text(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in hp.items())


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The :data:`IDENTITY` entries in which two ``bench.json`` objects differ (``new`` as
    JSON would read it back: tuples become lists)."""
    new = json.loads(json.dumps(new))
    return [k for k in IDENTITY if k in old and k in new and old[k] != new[k]]


def prepare_folder(out: Path, plan: BenchPlan, *, resume: bool, fresh: bool) -> list[str]:
    """Make ``out`` hold ``plan``'s experiment and nothing else; return what was done (for
    the user). Call it with the folder locked.

    Raises:
        ExperimentMismatch: ``out`` holds another experiment and ``fresh`` is off.
    """
    said = []
    bench_path = out / "bench.json"
    runs = out / "runs"
    has_runs = runs.is_dir() and any(runs.iterdir())
    if fresh:
        removed = [name for name in _EXPERIMENT_FILES if (out / name).exists()]
        for name in removed:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if removed:
            said.append(f"--fresh: removed the previous experiment from {out} "
                        f"({', '.join(removed)})")
    elif bench_path.exists() or has_runs:
        if not bench_path.exists():
            raise ExperimentMismatch(
                f"{out} holds runs but no bench.json, so they cannot be matched to this "
                "experiment; use --fresh to replace them or another --out")
        old = files.read_json(bench_path, "experiment record")
        diff = _differences(old if isinstance(old, dict) else {}, plan.as_dict())
        if diff or not isinstance(old, dict):
            raise ExperimentMismatch(
                f"{out} holds another experiment (it differs in: {', '.join(diff) or 'all'}); "
                "a results folder holds one experiment: use --fresh to replace it, another "
                "--out, or the same settings (with --resume to continue it)")
        if not resume:
            said.append(f"re-running the experiment in {out} from the start (--resume would "
                        "continue it from its checkpoints)")
    files.write_json(bench_path, plan.as_dict())
    files.remove_stale_temporaries(out)
    files.remove_stale_temporaries(out / "plots")
    return said


def run_bench(plan: BenchPlan, out: str | os.PathLike, *, resume: bool = False,
              fresh: bool = False, progress: bool | None = None, quiet: bool = False,
              workers: Workers | None = None, stop_after_steps: int | None = None
              ) -> str | None:
    """Run every method × seed of ``plan`` into ``out``; write and return the table.

    The dataset is loaded and checked, then ``out`` is locked and made to hold this
    experiment (:func:`prepare_folder`), and only then is anything written. With
    ``plan.interleave`` the methods of each seed take turns in this process
    (:func:`~natgrad.experiments.train.train_runs`). On several processes every worker
    calls this; rank 0 writes and returns the table, the others return ``None``.
    """
    workers = workers or Workers.single()
    out = Path(out)
    data = load(plan.dataset, plan.data_dir, plan.augment)
    speak = workers.is_main and not quiet
    lock = files.FolderLock(out)
    problem = None
    if workers.is_main:
        try:
            files.check_output_folder(out)
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            said = prepare_folder(out, plan, resume=resume, fresh=fresh)
            for line in [*lock.notes, *said, *plan.notes]:
                print(f"note: {line}", file=sys.stderr)
        except (ValueError, OSError, files.FolderBusy) as e:
            lock.release()
            problem = (type(e).__name__, str(e))
    problem = workers.from_main(problem)
    if problem is not None:
        kind, message = problem
        raise files.FolderBusy(message) if kind == "FolderBusy" else ValueError(message)
    try:
        for seed in plan.seeds:
            if speak:
                names = ", ".join(m.name for m in plan.methods)
                how = (f"taking turns every {plan.interleave} steps"
                       if plan.interleave and len(plan.methods) > 1 else "one after another")
                print(f"== seed {seed}: {names} ({how})", file=sys.stderr)
            train_runs([plan.run_config(m.name, seed) for m in plan.methods], data,
                       [out / "runs" / m.name / f"seed{seed}" for m in plan.methods],
                       interleave=plan.interleave, resume=resume, progress=progress,
                       quiet=quiet, workers=workers, stop_after_steps=stop_after_steps)
        return write_report(out) if workers.is_main else None
    finally:
        lock.release()


def write_report(out: str | os.PathLike, targets: Sequence[float] | None = None) -> str:
    """Rebuild ``results.md``, ``results.csv`` and ``plots/`` from the saved runs in ``out``;
    return the Markdown table (with a header saying what was run).

    Only the runs of the experiment ``bench.json`` names go into the table, and they must
    share one dataset, model, budget and batch.

    Raises:
        FileNotFoundError: no finished run under ``out/runs``.
        ValueError: a record cannot be read, or the runs are of different experiments.
    """
    out = Path(out)
    bench_path = out / "bench.json"
    bench = files.read_json(bench_path, "experiment record") if bench_path.exists() else {}
    if not isinstance(bench, dict):
        raise ValueError(f"experiment record {bench_path} is not a JSON object")
    runs = load_runs(out, bench.get("methods"), bench.get("seeds"))
    if not runs:
        raise FileNotFoundError(f"no runs under {out / 'runs'} (expected runs/<method>/seed<k>/)")
    consistent_runs(runs)
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
    interleave = bench.get("interleave")
    clock = (f"the methods took turns every {interleave} steps in one process"
             if interleave and len(order) > 1 else "the runs ran one after another")
    header = (
        f"# natgrad bench: {cfg['model']} on {cfg['dataset']}\n\n"
        f"Budget {budget} per run, {batch}, seeds {seeds}, "
        f"lr schedule {LRSchedule(**cfg['schedule'])}. Times are training-clock seconds "
        f"(evaluation excluded) measured in this run ({clock}) on "
        f"{bench.get('machine', {}).get('platform', 'this machine')} "
        f"({_threads(bench)}{' per process' if processes > 1 else ''}, load average "
        f"{_load(bench)} at the start{_load_during(runs)}). Time to a threshold is "
        f"the first evaluation at or above it ({cfg['evals_per_epoch']} evaluations per "
        "epoch); ratios are to the fastest first-order baseline in this run.\n\n"
    )
    unfinished = sorted({f"{r.spec}/seed{r.seed}" for r in runs
                         if r.status not in ("done", "diverged")})
    if unfinished:
        header += f"Unfinished runs (not in the table): {', '.join(unfinished)}.\n\n"
    torn = [f"{r.folder / 'log.jsonl'} line{'s' if len(r.torn) > 1 else ''} "
            f"{', '.join(map(str, r.torn))}" for r in runs if r.torn]
    if torn:
        line = "Torn log lines (skipped): " + "; ".join(torn) + "."
        print(f"note: {line}", file=sys.stderr)
        header += line + "\n\n"
    notes = fallback_notes(runs)
    text = header + table + ("\n" + "\n".join(notes) + "\n" if notes else "")
    files.atomic_write(out / "results.md", lambda f: f.write(text.encode()))
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


def _load_during(runs: Sequence[Any]) -> str:
    """The load average sampled at the runs' evaluations: ``, 0.9–2.3 (mean 1.4) during
    the runs``."""
    loads = [r.meta.get("load_average") for r in runs]
    loads = [x for x in loads if isinstance(x, dict) and x.get("samples")]
    if not loads:
        return ""
    low, high = min(x["min"] for x in loads), max(x["max"] for x in loads)
    mean = sum(x["mean"] * x["samples"] for x in loads) / sum(x["samples"] for x in loads)
    return f", {low:.1f}–{high:.1f} (mean {mean:.1f}) during the runs"
