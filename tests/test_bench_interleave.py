"""The interleaved clock of ``natgrad bench``: the methods of a bench take turns in one
process (``--interleave N``, the default), and each run's numbers are exactly those of
the same run alone: same batches, same losses, same weights, under either budget, through
an interruption and ``--resume``."""

from __future__ import annotations

import json

import pytest
import torch

from natgrad.cli import main
from natgrad.experiments import bench as bench_module
from natgrad.experiments import train as train_module
from natgrad.experiments.data import ImageData
from natgrad.experiments.peers import missing_reason
from natgrad.experiments.train import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--progress", "off",
        "--quiet"]
# SOAP draws from the global torch RNG nowhere we rely on, but it is a third-party
# optimizer with its own state: it belongs in the check when it is installed.
METHODS = "sgd,kfac,ekfac+adam" + (",soap" if missing_reason("soap") is None else "")


def _logs(out, specs, seed=0):
    return {s: [{k: v for k, v in r.items() if k != "time"}
                for r in read_log(out / "runs" / s / f"seed{seed}" / "log.jsonl")]
            for s in specs}


def _weights(out, spec, seed=0):
    return torch.load(out / "runs" / spec / f"seed{seed}" / "checkpoint.pt",
                      weights_only=False)["model"]


@pytest.fixture(scope="module")
def two_clocks(tmp_path_factory):
    """The same bench one method after another and taking turns every 3 steps (a chunk
    that does not divide the 22 steps of an epoch, so turns change mid-epoch and
    between an evaluation and a checkpoint)."""
    root = tmp_path_factory.mktemp("clocks")
    torch.set_num_threads(1)
    args = [*TINY, "--methods", METHODS, "--epochs", "1.5", "--evals-per-epoch", "3"]
    assert main(["bench", *args, "--interleave", "0", "--out", str(root / "seq")]) == 0
    assert main(["bench", *args, "--interleave", "3", "--out", str(root / "rr")]) == 0
    return root / "seq", root / "rr"


def test_interleaved_logs_equal_sequential_ones(two_clocks):
    seq, rr = two_clocks
    specs = METHODS.split(",")
    a, b = _logs(seq, specs), _logs(rr, specs)
    for spec in specs:
        # 3 train records (steps 10, 20, 30) and 6 evaluations (step 0, 3 in epoch 1, 2
        # in the half epoch: steps 7, 15, 22, 29, 33 and the end).
        assert len(a[spec]) == 3 + 6 and a[spec] == b[spec], spec
        for name, tensor in _weights(seq, spec).items():
            assert torch.equal(tensor, _weights(rr, spec)[name]), (spec, name)
    # Each run has its own clock: a time per step, never the sum over the others.
    for spec in specs:
        meta = json.loads((rr / "runs" / spec / "seed0" / "meta.json").read_text())
        assert meta["summary"]["steps"] == 33 and meta["status"] == "done"
    bench = json.loads((rr / "bench.json").read_text())
    assert bench["interleave"] == 3
    assert "took turns every 3 steps" in (rr / "results.md").read_text()
    assert "one after another" in (seq / "results.md").read_text()


def test_each_method_gets_the_sequential_batches(tmp_path, monkeypatch):
    """The batches (indices and augmented pixels) each method trains on, recorded in
    both modes, are the same list."""
    seen: dict[str, dict[str, list]] = {"seq": {}, "rr": {}}
    mode = {"now": "seq", "spec": None}
    step, batch = train_module._Run.train_step, ImageData.train_batch

    def recording_step(self):
        mode["spec"] = self.cfg.spec
        return step(self)

    def recording_batch(self, index, generator=None):
        x, y = batch(self, index, generator)
        seen[mode["now"]].setdefault(mode["spec"], []).append(
            (index.tolist(), float(x.double().sum())))
        return x, y

    monkeypatch.setattr(train_module._Run, "train_step", recording_step)
    monkeypatch.setattr(ImageData, "train_batch", recording_batch)
    args = [*TINY, "--methods", "sgd,kfac", "--epochs", "1.5", "--set", "kfac:T_inv=4"]
    assert main(["bench", *args, "--interleave", "0", "--out", str(tmp_path / "s")]) == 0
    mode["now"] = "rr"
    assert main(["bench", *args, "--interleave", "4", "--out", str(tmp_path / "r")]) == 0
    assert len(seen["seq"]["sgd"]) == 33
    assert seen["seq"] == seen["rr"]
    assert seen["rr"]["sgd"] == seen["rr"]["kfac"]  # and every method the same ones


def test_minutes_budget_on_each_methods_own_clock(tmp_path):
    budget_s = 0.4
    assert main(["bench", *TINY, "--methods", "sgd,kfac", "--minutes", str(budget_s / 60),
                 "--interleave", "2", "--log-every", "1", "--out", str(tmp_path)]) == 0
    for spec in ("sgd", "kfac"):
        times = [r["time"] for r in read_log(tmp_path / "runs" / spec / "seed0" / "log.jsonl")
                 if r["kind"] == "train"]
        # Its own clock reached the budget at its last step, not before.
        assert times[-2] < budget_s <= times[-1], spec


def _stopping_after(steps: int):
    """``train_runs`` that raises ``KeyboardInterrupt`` once a run reaches ``steps``."""
    real = train_module.train_runs

    def train_runs(*args, **kwargs):
        return real(*args, **{**kwargs, "stop_after_steps": steps})

    return train_runs


def test_interleaved_resume_equals_a_straight_run(tmp_path, monkeypatch, capsys):
    args = [*TINY, "--methods", "sgd,kfac", "--epochs", "2", "--evals-per-epoch", "1",
            "--interleave", "10"]
    assert main(["bench", *args, "--out", str(tmp_path / "straight")]) == 0
    # Turns of 10 steps: sgd reaches step 30 (checkpoint at 22) while kfac is at 20 (no
    # checkpoint yet): one run resumes, the other restarts.
    monkeypatch.setattr(bench_module, "train_runs", _stopping_after(30))
    assert main(["bench", *args, "--out", str(tmp_path / "resumed")]) == 130
    monkeypatch.undo()
    assert main(["bench", *args, "--resume", "--out", str(tmp_path / "resumed")]) == 0
    assert _logs(tmp_path / "straight", ["sgd", "kfac"]) == _logs(tmp_path / "resumed",
                                                                  ["sgd", "kfac"])


def test_the_shared_start_is_evaluated_once(tmp_path, monkeypatch):
    """Every method starts from the same weights: one pass over the test set serves all
    step-0 records; the evaluations after training are each method's own."""
    calls = []
    real = train_module.evaluate

    def counting(net, *args, **kwargs):
        calls.append(net)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", counting)
    assert main(["bench", *TINY, "--methods", "sgd,adam,kfac", "--epochs", "0.25",
                 "--evals-per-epoch", "1", "--out", str(tmp_path)]) == 0
    assert len(calls) == 1 + 3
    logs = _logs(tmp_path, ["sgd", "adam", "kfac"])
    first = [{k: v for k, v in logs[s][0].items() if k != "lr"} for s in logs]
    assert first[0] == first[1] == first[2]
    assert logs["sgd"][0]["step"] == 0 and logs["sgd"][-1] != logs["kfac"][-1]


def test_the_demo_interleaves_every_method_and_soap(monkeypatch):
    import natgrad
    from natgrad import demo

    seen = []
    monkeypatch.setattr(demo, "load_fashion_mnist", lambda: None)
    monkeypatch.setattr(demo, "cli_main", lambda argv: seen.append(argv) or 0)
    assert demo.main(["--seed", "3"]) == 0
    (argv,) = seen
    methods = argv[argv.index("--methods") + 1].split(",")
    expected = ["sgd", "adam", *natgrad.METHODS] + (
        ["soap"] if missing_reason("soap") is None else [])
    assert methods == expected
    assert "--interleave" not in argv  # bench's default: turns of 10 steps
    minutes = float(argv[argv.index("--minutes") + 1])
    assert minutes * len(methods) == pytest.approx(demo.TOTAL_TRAINING_MINUTES, rel=1e-2)
    assert argv[-2:] == ["--seed", "3"]  # the user's options come last and win
