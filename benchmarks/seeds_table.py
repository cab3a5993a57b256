"""Several seeds of ``time_to_accuracy.py`` in one table: per run and target, the time
and steps to the target on each seed, and the ratio of its time to a reference run's on
the same seed (each seed's runs were interleaved in one process, so only ratios within a
seed compare; the median over seeds is printed beside them).

Usage::

    for s in 0 1 2; do python benchmarks/time_to_accuracy.py --runs sgd adam soap kfac \\
        --seed $s --json > seed$s.json; done
    python benchmarks/seeds_table.py seed0.json seed1.json seed2.json [--against soap] [--json] \
        [--plot acc.png]

``--plot`` draws test accuracy against each run's own training clock, one panel per seed
(the clocks of different seeds do not compare: each seed ran in its own process), with the
targets as dotted lines.

A run that did not reach a target on a seed counts as ``inf`` there (``null`` under
``--json``; the median then says whether it reached it on most seeds); where only the
reference missed it, the ratio is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys


def load(paths: list[str]) -> list[dict]:
    """The reports, refusing files that are not ``time_to_accuracy.py --json`` output or
    that come from different experiments (other targets, batch size or test size)."""
    reports = []
    for path in paths:
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"seeds_table: cannot read {path}: {err}") from None
        if not isinstance(report, dict) or "runs" not in report or "targets" not in report:
            raise SystemExit(f"seeds_table: {path} is not a time_to_accuracy.py --json report")
        reports.append(report)
    keys = ("targets", "batch_size", "test_size", "eval_every", "model")
    for path, report in zip(paths[1:], reports[1:]):
        differ = [k for k in keys if report.get(k) != reports[0].get(k)]
        if differ:
            raise SystemExit(f"seeds_table: {path} differs from {paths[0]} in {differ}")
    return reports


def table(reports: list[dict], against: str) -> dict:
    """``{run: {target: {"seconds": [...], "steps": [...], "ratio": [...],
    "median_ratio": x}}, ...}`` with one entry per seed, in the order given."""
    targets = [f"{t:g}" for t in reports[0]["targets"]]
    labels = [label for label in reports[0]["runs"]
              if all(label in r["runs"] for r in reports)]
    if against not in labels:
        raise SystemExit(f"seeds_table: --against {against!r} is not a run of every report; "
                         f"runs: {', '.join(labels)}")
    out: dict = {}
    for label in labels:
        out[label] = {}
        for target in targets:
            seconds, steps, ratios = [], [], []
            for report in reports:
                hit = report["runs"][label]["reached"].get(target)
                ref = report["runs"][against]["reached"].get(target)
                seconds.append(hit["seconds"] if hit else math.inf)
                steps.append(hit["step"] if hit else None)
                if hit and ref:
                    ratios.append(hit["seconds"] / ref["seconds"])
                else:
                    ratios.append(math.inf if not hit else 0.0)
            out[label][target] = {"seconds": seconds, "steps": steps, "ratio": ratios,
                                  "median_ratio": statistics.median(ratios)}
        ms = [r["runs"][label]["ms_per_step"] / r["runs"][against]["ms_per_step"]
              for r in reports]
        out[label]["step_cost_ratio"] = statistics.median(ms)
    return out


def _finite(value):
    """``inf`` (a target not reached) as ``None``, so that the output is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isinf(value) else value


def plot(reports: list[dict], path: str) -> None:
    """Test accuracy against each run's training clock, one panel per report (seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 4), dpi=110,
                             sharey=True, squeeze=False)
    targets = reports[0]["targets"]
    for ax, report in zip(axes[0], reports):
        for label, run in report["runs"].items():
            evals = run["evals"]
            ax.plot([e["seconds"] for e in evals], [e["test_acc"] for e in evals],
                    label=label, linewidth=1.5, marker=".", markersize=3)
        for t in targets:
            ax.axhline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(min(targets) - 8, max(targets) + 2)
        ax.set_title(f"seed {report.get('seed')}")
        ax.set_xlabel("own training clock (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="time_to_accuracy.py --json outputs")
    parser.add_argument("--against", default="soap", help="the reference run's label")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="PNG", help="also draw accuracy against time here")
    args = parser.parse_args(argv)
    reports = load(args.reports)
    if args.plot:
        plot(reports, args.plot)
    result = table(reports, args.against)
    seeds = [r.get("seed") for r in reports]
    if args.json:
        print(json.dumps({"seeds": seeds, "against": args.against, "runs": _finite(result)}))
        return 0
    print(f"seeds {seeds}; time to target (s/steps) per seed, ratio to {args.against}'s "
          "time on the same seed (0: reference missed it; inf: this run did)")
    for label, row in result.items():
        for target, cell in row.items():
            if target == "step_cost_ratio":
                continue
            per = "  ".join(
                f"{s:6.1f}/{n:<4}" if n is not None else f"{'—':>11}"
                for s, n in zip(cell["seconds"], cell["steps"])
            )
            ratios = " ".join(f"{x:.2f}" for x in cell["ratio"])
            print(f"{label:<28} {target:>4}%  {per}   ×{args.against}: {ratios}  "
                  f"median {cell['median_ratio']:.2f}")
        print(f"{label:<28} step cost × {args.against}: {row['step_cost_ratio']:.2f} (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
