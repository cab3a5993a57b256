"""Every benchmark script parses its arguments and offers --json (figures are not tested)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_help_lists_json(script):
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--json" in out.stdout


def test_step_overhead_rejects_unknown_method():
    script = SCRIPTS[[s.name for s in SCRIPTS].index("step_overhead.py")]
    out = subprocess.run(
        [sys.executable, str(script), "--methods", "nope"], capture_output=True, text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown method 'nope'" in out.stderr


def _run_json(name, *args):
    import json

    script = SCRIPTS[[s.name for s in SCRIPTS].index(name)]
    out = subprocess.run(
        [sys.executable, str(script), *args, "--json"], capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_untuned_digits_reports_every_run():
    report = _run_json("untuned_digits.py", "--runs", "kfac", "sgd:lr=0.01", "--steps", "12")
    assert set(report["runs"]) == {"sgd:lr=0.05", "kfac", "sgd:lr=0.01"}
    assert report["runs"]["kfac"]["verdict"] in ("ok", "behind", "stalled", "diverged")


def test_time_to_accuracy_runs_interleaved_on_own_clocks():
    from natgrad.experiments.data import DatasetMissing, load_fashion_mnist

    try:
        load_fashion_mnist()
    except DatasetMissing:
        pytest.skip("Fashion-MNIST is not installed")
    report = _run_json("time_to_accuracy.py", "--runs", "sgd", "kfac+adam", "--epochs",
                       "0.01", "--chunk", "2", "--eval-every", "4", "--test-size", "100")
    runs = report["runs"]
    steps = [r["steps"] for r in runs.values()]  # ceil(0.01 epoch) = 5, same batches
    assert steps == [5, 5]
    assert all([e["step"] for e in r["evals"]] == [4, 5] for r in runs.values())
    assert all(r["ms_per_step"] > 0 for r in runs.values())
    # The last chunk is one step: its train_loss is that step's loss (about ln 10 this
    # early), not the last `--chunk` losses divided by one.
    assert all(0 < e["train_loss"] < 3.0 for r in runs.values() for e in r["evals"])


def _report(seed, runs, targets=(88.0,)):
    """A time_to_accuracy.py --json report with ``runs = {label: (ms, {target: (s, step)})}``."""
    return {
        "model": "fmnist_cnn", "batch_size": 128, "test_size": 5000, "eval_every": 20,
        "seed": seed, "targets": list(targets),
        "runs": {
            label: {"ms_per_step": ms, "evals": [{"seconds": 1.0, "test_acc": 80.0}],
                    "reached": {
                f"{t:g}": ({"seconds": hits[t][0], "step": hits[t][1]} if t in hits else None)
                for t in targets}}
            for label, (ms, hits) in runs.items()
        },
    }


def test_seeds_table_ratios_within_each_seed(tmp_path):
    import json

    paths = []
    reports = [
        _report(0, {"soap": (400, {88.0: (60.0, 160)}), "kfac": (480, {88.0: (45.0, 100)})}),
        _report(1, {"soap": (400, {88.0: (100.0, 220)}), "kfac": (440, {})}),
        _report(2, {"soap": (500, {}), "kfac": (500, {88.0: (80.0, 160)})}),
    ]
    for i, report in enumerate(reports):
        path = tmp_path / f"seed{i}.json"
        path.write_text(json.dumps(report))
        paths.append(str(path))
    out = _run_json("seeds_table.py", *paths, "--plot", str(tmp_path / "acc.png"))
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kfac = out["runs"]["kfac"]
    # seed 0: 45/60; seed 1: kfac missed it (inf, null in JSON); seed 2: soap missed it (0).
    assert kfac["88"]["ratio"] == [0.75, None, 0.0]
    assert kfac["88"]["steps"] == [100, None, 160]
    assert kfac["88"]["median_ratio"] == 0.75
    assert kfac["step_cost_ratio"] == 1.1  # median of 1.2, 1.1, 1.0
    assert out["runs"]["soap"]["88"]["median_ratio"] == 1.0  # 1, 1, and a miss on seed 2 (inf)


def test_time_to_accuracy_full_keeps_runs_past_their_last_target():
    from natgrad.experiments.data import DatasetMissing, load_fashion_mnist

    try:
        load_fashion_mnist()
    except DatasetMissing:
        pytest.skip("Fashion-MNIST is not installed")
    common = ("--runs", "sgd", "--epochs", "0.01", "--chunk", "2", "--eval-every", "2",
              "--test-size", "50", "--targets", "0")  # every evaluation is >= 0 %
    stopped = _run_json("time_to_accuracy.py", *common)["runs"]["sgd"]
    full = _run_json("time_to_accuracy.py", *common, "--full")["runs"]["sgd"]
    assert stopped["steps"] == 2 and stopped["reached"]["0"]["step"] == 2
    assert full["steps"] == 5 and full["reached"]["0"]["step"] == 2
