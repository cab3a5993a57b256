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
