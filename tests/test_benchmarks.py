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
