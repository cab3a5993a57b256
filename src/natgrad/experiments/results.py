"""Read saved runs and summarise them as the papers' comparison table.

Columns (``000_…`` Table 2 style, plus time to accuracy): final test accuracy and loss,
milliseconds per iteration and its ratio to SGD-momentum's, training wall time, and for
each ``--targets`` threshold the training time until the first evaluation at or above it
and its ratio to the best first-order baseline (SGD-momentum, Adam, ... in the same run).
With several seeds every cell is ``mean ± std``; a threshold some seeds never reached
shows ``(k/n)`` and averages the seeds that did.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files

__all__ = ["Run", "Row", "load_runs", "consistent_runs", "fallback_notes", "time_to_target",
           "epochs_to_target", "summarise", "markdown_table", "write_csv"]


@dataclass
class Run:
    """One saved run: its spec, seed, ``meta.json``, eval and train log records."""

    spec: str
    seed: int
    meta: dict[str, Any]
    evals: list[dict[str, Any]]
    train: list[dict[str, Any]] = field(default_factory=list)
    folder: Path = Path(".")
    torn: list[int] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.meta.get("status", "unknown")

    @property
    def fell_back(self) -> bool:
        """The preconditioner did not precondition everywhere (plain gradient on some
        steps, or a numerical warning)."""
        fb = self.meta.get("fallbacks") or {}
        return bool(fb.get("plain_gradient_steps") or fb.get("warnings"))


def load_runs(out_dir: str | os.PathLike, methods: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None) -> list[Run]:
    """Every run under ``out_dir/runs/<spec>/seed<k>/`` that has a ``meta.json`` (only
    ``methods`` × ``seeds`` when given: the experiment's runs).

    Raises:
        ValueError: a ``meta.json`` that is not a run record, naming the file.
    """
    runs = []
    for meta_path in sorted(Path(out_dir).glob("runs/*/seed*/meta.json")):
        meta = files.read_json(meta_path, "run record")
        try:
            cfg = meta["config"]
            spec, seed = cfg["spec"], int(cfg["seed"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"run record {meta_path} has no config with spec and seed"
                             ) from None
        if (methods is not None and spec not in methods) or (
                seeds is not None and seed not in seeds):
            continue
        log_path = meta_path.parent / "log.jsonl"
        log = files.read_log(log_path) if log_path.exists() else files.Log([], [])
        runs.append(Run(spec, seed, meta,
                        [r for r in log.records if r.get("kind") == "eval"],
                        [r for r in log.records if r.get("kind") == "train"],
                        meta_path.parent, log.torn))
    return runs


#: Run settings every run of one table shares (the method's own hyperparameters and the
#: seed may differ).
_SHARED = ("dataset", "model", "batch_size", "epochs", "minutes", "schedule",
           "evals_per_epoch", "augment", "processes")


def consistent_runs(runs: Sequence[Run]) -> None:
    """Check that ``runs`` belong to one experiment.

    Raises:
        ValueError: two runs differ in a shared setting, naming both and the setting.
    """
    first = runs[0]
    for run in runs[1:]:
        for key in _SHARED:
            a, b = first.meta["config"].get(key), run.meta["config"].get(key)
            if a != b:
                raise ValueError(
                    f"{first.folder} and {run.folder} are runs of different experiments "
                    f"({key} {a!r} vs {b!r}); one results folder holds one experiment")


def fallback_notes(runs: Sequence[Run]) -> list[str]:
    """One line per run whose method fell back (marked † in the table)."""
    notes = []
    for r in runs:
        if not r.fell_back:
            continue
        fb = r.meta["fallbacks"]
        parts = []
        if fb.get("plain_gradient_steps"):
            steps = r.meta.get("summary", {}).get("steps")
            layers = fb.get("plain_gradient_layers") or []
            parts.append(f"plain gradient on {fb['plain_gradient_steps']}"
                         f"{f' of {steps}' if steps else ''} steps ({len(layers)} "
                         f"layer{'s' if len(layers) != 1 else ''}: {', '.join(layers)})")
        warned = fb.get("warnings") or []
        if warned:
            parts.append(f"{len(warned)} numerical warning{'s' if len(warned) > 1 else ''}, "
                         f"first at step {warned[0]['step']}: {warned[0]['message']}")
        notes.append(f"† {r.spec} seed {r.seed}: {'; '.join(parts)}.")
    return notes


def _first_at(evals: Iterable[dict[str, Any]], target: float, key: str) -> float | None:
    for r in evals:
        if r["test_acc"] >= target:
            return float(r[key])
    return None


def time_to_target(evals: Iterable[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation with test accuracy ≥ ``target`` (0–1)."""
    return _first_at(evals, target, "time")


def epochs_to_target(evals: Iterable[dict[str, Any]], target: float) -> float | None:
    """Epochs at the first evaluation with test accuracy ≥ ``target`` (0–1); unlike the
    time it does not depend on the machine or its load."""
    return _first_at(evals, target, "epoch")


@dataclass
class Stat:
    """Mean ± std of the values of the runs that have one (``n`` of ``total``)."""

    values: list[float]
    total: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else (
            0.0 if self.values else None)

    def text(self, fmt: str, scale: float = 1.0) -> str:
        if not self.values:
            return "—"
        out = format(self.mean * scale, fmt)
        if self.total > 1:
            out += " ± " + format(self.std * scale, fmt)
        if self.n < self.total:
            out += f" ({self.n}/{self.total})"
        return out


@dataclass
class Row:
    """One method's line of the table."""

    spec: str
    runs: int
    diverged: int
    test_acc: Stat
    test_loss: Stat
    ms_per_iter: Stat
    train_time: Stat
    to_target: dict[float, Stat] = field(default_factory=dict)
    epochs_to: dict[float, Stat] = field(default_factory=dict)
    ms_ratio: float | None = None
    target_ratio: dict[float, float | None] = field(default_factory=dict)
    fell_back: int = 0


def _first_order(spec: str) -> bool:
    from .methods import resolve

    try:
        return resolve(spec).first_order
    except ValueError:  # a method this install no longer has
        return False


def summarise(runs: Sequence[Run], targets: Sequence[float], order: Sequence[str] = (),
              baseline: str = "sgd") -> list[Row]:
    """One :class:`Row` per spec (in ``order``, then any others), finished runs only.

    ``targets`` are accuracies in 0–1. ``ms_ratio`` is ms/iter over ``baseline``'s;
    ``target_ratio[t]`` is time to ``t`` over the fastest first-order baseline's (only
    baselines that reached ``t`` in every seed count).
    """
    specs = [s for s in order if any(r.spec == s for r in runs)]
    specs += sorted({r.spec for r in runs} - set(specs))
    rows = []
    for spec in specs:
        group = [r for r in runs if r.spec == spec and r.status in ("done", "diverged")]
        if not group:
            continue
        done = [r for r in group if r.status == "done"]
        total = len(group)

        def stat(key: str, pool: list[Run] = done, total: int = total) -> Stat:
            return Stat([float(r.meta["summary"][key]) for r in pool
                         if r.meta["summary"].get(key) is not None], total)

        row = Row(spec, total, total - len(done), stat("test_acc"), stat("test_loss"),
                  stat("ms_per_iter", group), stat("train_time", group))
        row.fell_back = sum(r.fell_back for r in group)
        for t in targets:
            times = [time_to_target(r.evals, t) for r in done]
            row.to_target[t] = Stat([x for x in times if x is not None], total)
            epochs = [epochs_to_target(r.evals, t) for r in done]
            row.epochs_to[t] = Stat([x for x in epochs if x is not None], total)
        rows.append(row)
    base = next((r for r in rows if r.spec == baseline), None)
    for row in rows:
        if base is not None and base.ms_per_iter.mean:
            row.ms_ratio = row.ms_per_iter.mean / base.ms_per_iter.mean
        for t in targets:
            best = [r.to_target[t].mean for r in rows if _first_order(r.spec)
                    and r.to_target[t].n == r.runs and r.to_target[t].mean is not None]
            mine = row.to_target[t]
            row.target_ratio[t] = (
                mine.mean / min(best) if best and min(best) > 0 and mine.mean is not None
                else None
            )
    return rows


def _pct(t: float) -> str:
    return f"{100 * t:g}%"


def markdown_table(rows: Sequence[Row], targets: Sequence[float]) -> str:
    """The comparison table in Markdown (accuracy in %, times in seconds)."""
    head = ["method", "runs", "test acc (%)", "test loss", "ms/iter", "× SGD", "train time (s)"]
    for t in targets:
        head += [f"t→{_pct(t)} (s)", f"epochs→{_pct(t)}", f"÷ best 1st-order ({_pct(t)})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.spec + (f" ({r.diverged} diverged)" if r.diverged else "")
            + (f" † (fell back in {r.fell_back}/{r.runs})" if r.fell_back else ""),
            str(r.runs),
            r.test_acc.text(".2f", 100),
            r.test_loss.text(".4f"),
            r.ms_per_iter.text(".1f"),
            "—" if r.ms_ratio is None else f"{r.ms_ratio:.2f}",
            r.train_time.text(".1f"),
        ]
        for t in targets:
            ratio = r.target_ratio.get(t)
            cells += [r.to_target[t].text(".1f"), r.epochs_to[t].text(".2f"),
                      "—" if ratio is None else f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], targets: Sequence[float], path: str | os.PathLike) -> None:
    """The table as CSV with separate mean/std columns (empty = not available)."""

    def num(x: float | None) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x)

    head = ["method", "runs", "diverged", "fell_back", "test_acc_mean", "test_acc_std",
            "test_loss_mean", "test_loss_std", "ms_per_iter_mean", "ms_per_iter_std",
            "ms_ratio_sgd", "train_time_mean", "train_time_std"]
    for t in targets:
        head += [f"time_to_{t:g}_mean", f"time_to_{t:g}_std", f"epochs_to_{t:g}_mean",
                 f"reached_{t:g}", f"ratio_best_first_order_{t:g}"]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(head)
    for r in rows:
        line = [r.spec, r.runs, r.diverged, r.fell_back]
        for s in (r.test_acc, r.test_loss, r.ms_per_iter):
            line += [num(s.mean), num(s.std)]
        line.append(num(r.ms_ratio))
        line += [num(r.train_time.mean), num(r.train_time.std)]
        for t in targets:
            s = r.to_target[t]
            line += [num(s.mean), num(s.std), num(r.epochs_to[t].mean), f"{s.n}/{r.runs}",
                     num(r.target_ratio[t])]
        w.writerow(line)
    files.atomic_write(path, lambda out: out.write(f.getvalue().encode()))
