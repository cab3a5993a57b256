"""PNG plots of saved runs: test accuracy and training loss against epochs and against
training wall time, one line per method (the mean over seeds, shaded ± std). With
accuracy targets, the accuracy plots show the band from 15 points below the lowest
target up (the first evaluations enter from below)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import files
from .results import Run

__all__ = ["PLOTS", "write_plots"]

#: File name → (y key, x key, y label, x label).
PLOTS: dict[str, tuple[str, str, str, str]] = {
    "test_acc_vs_epoch.png": ("test_acc", "epoch", "test accuracy (%)", "epoch"),
    "test_acc_vs_time.png": ("test_acc", "time", "test accuracy (%)", "training time (s)"),
    "train_loss_vs_epoch.png": ("train_loss", "epoch", "training loss", "epoch"),
    "train_loss_vs_time.png": ("train_loss", "time", "training loss", "training time (s)"),
}


def _curves(runs: Sequence[Run], y: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean y and std y over seeds, aligned by record index (cut to the shortest
    run). Training loss comes from the frequent ``train`` records when the log has them."""
    series = []
    for run in runs:
        records = run.train if y == "train_loss" and run.train else run.evals
        pts = [(r[x], r[y]) for r in records if r.get(y) is not None]
        if pts:
            series.append(np.array(pts, dtype=float))
    if not series:
        return np.empty(0), np.empty(0), np.empty(0)
    n = min(len(s) for s in series)
    stack = np.stack([s[:n] for s in series])
    return stack[:, :, 0].mean(0), stack[:, :, 1].mean(0), stack[:, :, 1].std(0)


def write_plots(runs: Sequence[Run], out_dir: str | os.PathLike, order: Sequence[str] = (),
                targets: Sequence[float] = (), title: str = "") -> list[Path]:
    """Write the four :data:`PLOTS` into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(out)
    specs = [s for s in order if any(r.spec == s for r in runs)]
    specs += sorted({r.spec for r in runs} - set(specs))
    paths = []
    for name, (y, x, ylabel, xlabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        peak = 0.0
        for spec in specs:
            xs, mean, std = _curves([r for r in runs if r.spec == spec], y, x)
            if xs.size == 0:
                continue
            scale = 100.0 if y == "test_acc" else 1.0
            (line,) = ax.plot(xs, mean * scale, label=spec, linewidth=1.6)
            peak = max(peak, float(np.nanmax(mean)) * scale)
            if np.any(std > 0):
                ax.fill_between(xs, (mean - std) * scale, (mean + std) * scale,
                                color=line.get_color(), alpha=0.15, linewidth=0)
        if y == "test_acc":
            for t in targets:
                ax.axhline(100 * t, color="grey", linestyle=":", linewidth=1)
            if targets:  # the race is near the targets: show from 15 points below them
                top = max(100 * max(targets), peak)
                ax.set_ylim(max(0.0, 100 * min(targets) - 15), min(100.0, top + 1))
        else:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if specs:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        try:  # to plots/NAME.tmp, then renamed: a kill or a full disk leaves the old plot
            files.atomic_write(path, lambda f, fig=fig: fig.savefig(f, format="png"))
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
