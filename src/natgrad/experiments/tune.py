"""``natgrad tune``: the papers' grid search — learning rate × damping × weight decay, a few
epochs per point, the best point by training loss (Xu 2021, §4.2) — written as a settings
JSON that ``natgrad bench --settings`` reads.

Settings file::

    {"source": "natgrad tune", "dataset": ..., "model": ..., "epochs": ...,
     "criterion": "...",
     "settings": {"<spec>": {"lr": ..., "weight_decay": ..., "damping": ...}, ...},
     "unconverged": ["<spec>", ...],
     "results": [{"spec": ..., "hyperparameters": {...}, "train_loss": ..., ...}, ...]}

A point counts only if its run finished with a finite training loss below the untrained
model's test loss (its first evaluation); a method none of whose points did gets no
settings (it is listed under ``unconverged``), so ``bench --settings`` keeps its defaults
rather than a diverged learning rate.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import files
from .bench import BenchPlan
from .data import load
from .methods import MethodSpec, resolve
from .train import read_log, train_run

__all__ = [
    "grid_points",
    "build_grids",
    "run_tune",
    "read_settings",
    "check_settings_out",
    "LR_MULTIPLIERS",
    "DEFAULT_DAMPINGS",
    "DEFAULT_WEIGHT_DECAYS",
    "CRITERION",
]

#: Default learning-rate grid: each method's default lr times these.
LR_MULTIPLIERS = (1 / 3, 1.0, 3.0)
#: Default damping grid (Xu 2021's).
DEFAULT_DAMPINGS = (0.03, 0.003, 0.001)
#: Default weight-decay grid.
DEFAULT_WEIGHT_DECAYS = (0.0, 5e-4)
CRITERION = "mean training loss over the last epoch of the tuning run (lower is better)"


def grid_points(
    method: MethodSpec,
    base: dict[str, Any],
    lrs: Sequence[float] | None = None,
    dampings: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Hyperparameter dicts of the grid for one method (``base`` updated per point).

    ``lrs=None`` → ``base["lr"]`` × :data:`LR_MULTIPLIERS`; damping is searched only for
    methods that have a ``damping`` field.
    """
    lrs = lrs or [round(base["lr"] * m, 12) for m in LR_MULTIPLIERS]
    has_damping = "damping" in method.fields()
    dampings = (dampings or DEFAULT_DAMPINGS) if has_damping else [None]
    weight_decays = DEFAULT_WEIGHT_DECAYS if weight_decays is None else weight_decays
    points = []
    for lr, damping, wd in itertools.product(lrs, dampings, weight_decays):
        hp = dict(base, lr=float(lr), weight_decay=float(wd))
        if damping is not None:
            hp["damping"] = float(damping)
        points.append(hp)
    return points


def build_grids(
    plan: BenchPlan,
    preset_grid: dict[str, Sequence[float]] | None = None,
    *,
    lrs: Sequence[float] | None = None,
    dampings: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every method's grid points: the given values, else the preset's grid (``lr``, or
    ``lr_first_order`` for first-order baselines; ``damping``; ``weight_decay``), else the
    defaults of :func:`grid_points`. Every point's values are checked here, before the
    first one trains.

    Raises:
        ValueError: a damping <= 0, a weight decay < 0 or a point's lr out of range.
    """
    grid = dict(preset_grid or {})
    dampings = dampings or grid.get("damping")
    weight_decays = grid.get("weight_decay") if weight_decays is None else weight_decays
    for option, values, ok, allowed in (
            ("--dampings", dampings, lambda v: v > 0, "> 0"),
            ("--weight-decays", weight_decays, lambda v: v >= 0, ">= 0")):
        bad = [v for v in values or () if not (math.isfinite(v) and ok(v))]
        if bad:
            raise ValueError(f"{option} must be {allowed}, got {bad[0]:g}")
    grids = {}
    for m in plan.methods:
        m_lrs = lrs or grid.get("lr_first_order" if m.first_order else "lr") or (
            grid.get("lr") if m.peer else None)
        grids[m.name] = grid_points(m, plan.hyperparameters[m.name], m_lrs, dampings,
                                    weight_decays)
        for hp in grids[m.name]:
            m.check(hp)
    return grids


def _label(hp: dict[str, Any]) -> str:
    keys = [k for k in ("lr", "damping", "weight_decay") if k in hp]
    return ",".join(f"{k}={hp[k]:g}" for k in keys)


def run_tune(
    plan: BenchPlan,
    grids: dict[str, list[dict[str, Any]]],
    out: str | os.PathLike,
    settings_path: str | os.PathLike,
    *,
    resume: bool = False,
    fresh: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train every grid point of every method (seed ``plan.seeds[0]``) into
    ``out/tune/<spec>/<point>/``; write and return the settings JSON.

    ``out`` is locked while tuning; ``fresh`` removes earlier tuning runs first (otherwise
    a point's run folder is started afresh, or continued with ``resume``)."""
    out = Path(out)
    check_settings_out(settings_path)
    data = load(plan.dataset, plan.data_dir, plan.augment)
    out.mkdir(parents=True, exist_ok=True)
    with files.FolderLock(out) as lock:
        for note in lock.notes:
            print(f"note: {note}", file=sys.stderr)
        if fresh and (out / "tune").exists():
            shutil.rmtree(out / "tune")
            print(f"note: --fresh: removed the earlier tuning runs in {out / 'tune'}",
                  file=sys.stderr)
        return _tune(plan, grids, out, settings_path, data, resume, progress, quiet)


def _tune(plan: BenchPlan, grids: dict[str, list[dict[str, Any]]], out: Path,
          settings_path: str | os.PathLike, data, resume: bool, progress: bool | None,
          quiet: bool) -> dict[str, Any]:
    seed = plan.seeds[0]
    results: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    total = sum(len(points) for points in grids.values())
    count = 0
    for method in plan.methods:
        best_loss = math.inf
        for hp in grids[method.name]:
            count += 1
            if not quiet:
                print(f"== tune {count}/{total}: {method.name} {_label(hp)}", file=sys.stderr)
            plan.hyperparameters[method.name] = hp
            folder = out / "tune" / method.name / _label(hp)
            summary = train_run(plan.run_config(method.name, seed), data, folder,
                                resume=resume, progress=progress, quiet=True)
            loss = summary.get("final_train_loss")
            if not _converged(summary, folder):
                loss = math.inf  # diverged or no better than the start: never the best
            results.append({"spec": method.name, "hyperparameters": hp, "train_loss": loss,
                            "test_acc": summary.get("test_acc"), "status": summary["status"]})
            if loss < best_loss:
                best_loss, best[method.name] = loss, hp
    unconverged = [m.name for m in plan.methods if m.name not in best]
    for name in unconverged:
        print(f"note: tune: no point of {name} converged (each diverged or ended above the "
              "untrained model's loss); it gets no "
              "settings, so `bench --settings` keeps its defaults", file=sys.stderr)
    settings = {
        "source": "natgrad tune", "dataset": plan.dataset, "model": plan.model,
        "epochs": plan.epochs, "minutes": plan.minutes, "batch_size": plan.batch_size,
        "seed": seed, "criterion": CRITERION, "settings": best, "unconverged": unconverged,
        "results": [dict(r, train_loss=None if math.isinf(r["train_loss"]) else
                         r["train_loss"]) for r in results],
    }
    Path(settings_path).parent.mkdir(parents=True, exist_ok=True)
    files.write_json(settings_path, settings)
    return settings


def _converged(summary: dict[str, Any], folder: Path) -> bool:
    """Finished with a finite training loss below the untrained model's test loss."""
    loss = summary.get("final_train_loss")
    if summary.get("status") != "done" or loss is None or not math.isfinite(loss):
        return False
    records = read_log(folder / "log.jsonl")
    start = next((r.get("test_loss") for r in records if r.get("kind") == "eval"), None)
    return start is None or loss < start


def check_settings_out(path: str | os.PathLike) -> None:
    """``--settings-out`` must be a file this process can write (checked before tuning).

    Raises:
        ValueError: it is a folder, or its folder is a file or not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--settings-out {path} is a folder; give a file name such as "
                         f"{path / 'settings.json'}")
    files.check_output_folder(path.parent, "--settings-out's folder")


def read_settings(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ``settings`` mapping of a tune JSON (spec → hyperparameters).

    Raises:
        ValueError: the file is not a settings JSON, naming the path.
    """
    try:
        obj = files.read_json(path, "--settings file")
    except FileNotFoundError:
        raise FileNotFoundError(f"--settings file {path} does not exist") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("settings"), dict):
        raise ValueError(f"--settings file {path} has no 'settings' object "
                         "(write one with `natgrad tune`)")
    for spec, hp in obj["settings"].items():
        try:
            resolve(spec)
        except ValueError as e:
            raise ValueError(f"--settings file {path}: {e}") from None
        if not isinstance(hp, dict):
            raise ValueError(f"--settings file {path}: the settings of {spec!r} must be an "
                             f"object of hyperparameters, got {hp!r}")
    return obj["settings"]
