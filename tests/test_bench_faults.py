"""``natgrad bench/tune/report`` under faults and bad input (issue 14): one experiment
per results folder, a lock on it, nothing written before the plan is valid, one-line
errors, atomic writes, fallbacks and diverged tuning points recorded for what they are."""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from natgrad.cli import main
from natgrad.experiments import bench as bench_module
from natgrad.experiments import files
from natgrad.experiments import methods as M
from natgrad.experiments import train as train_module

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--progress", "off",
        "--quiet"]
HALF = [*TINY, "--epochs", "0.5"]  # 11 steps


def _bench(out, *argv) -> int:
    return main(["bench", *HALF, *argv, "--out", str(out)])


def _one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ------------------------------------------------------------------ 1: one experiment
def test_a_folder_holds_one_experiment(tmp_path, capsys):
    out = tmp_path / "mix"
    assert _bench(out, "--methods", "sgd,kfac") == 0
    table = (out / "results.md").read_text()
    # Before: sgd was re-run with the new settings and kfac's old run stayed beside it.
    assert _bench(out, "--methods", "sgd", "--lr", "0.5", "--epochs", "0.25") == 2
    _one_line_error(capsys, r"holds another experiment \(it differs in: methods, "
                    r"hyperparameters, epochs\).*--fresh")
    assert (out / "results.md").read_text() == table
    # The same settings again restart it (said), --fresh replaces it (said).
    assert _bench(out, "--methods", "sgd,kfac") == 0
    assert "re-running the experiment" in capsys.readouterr().err
    assert _bench(out, "--methods", "sgd", "--lr", "0.5", "--fresh") == 0
    assert "--fresh: removed the previous experiment" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["sgd"]
    assert "| kfac |" not in (out / "results.md").read_text()


def test_report_refuses_runs_of_different_experiments(tmp_path, capsys):
    out = tmp_path / "r"
    assert _bench(out, "--methods", "sgd,adam") == 0
    meta_path = out / "runs" / "adam" / "seed0" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["epochs"] = 3  # an old run of another budget, copied in by hand
    meta_path.write_text(json.dumps(meta))
    assert main(["report", str(out)]) == 2
    _one_line_error(capsys, "runs of different experiments \\(epochs (0.5 vs 3|3 vs 0.5)\\)")


# ------------------------------------------------------------------ 3: the lock
def test_a_locked_folder_names_its_holder_and_a_dead_holder_is_replaced(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-01-01 10:00"}
        (out / ".lock").write_text(json.dumps(lock))
        assert _bench(out, "--methods", "sgd") == 2
        _one_line_error(capsys, f"is in use by pid {holder.pid} on {socket.gethostname()} "
                        r"\(started 2026-01-01 10:00\)")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert _bench(out, "--methods", "sgd") == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {out} from pid {holder.pid}" in err
    assert "no longer running" in err
    assert not (out / ".lock").exists()  # released at the end


def test_the_lock_is_held_while_training(tmp_path, monkeypatch):
    held = []
    real = train_module.train_runs

    def train_runs(*args, **kwargs):
        held.append(json.loads((tmp_path / ".lock").read_text()))
        with pytest.raises(files.FolderBusy):
            files.FolderLock(tmp_path).acquire()  # a second writer is refused meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_module, "train_runs", train_runs)
    assert _bench(tmp_path, "--methods", "sgd") == 0
    assert held[0]["pid"] == os.getpid() and not (tmp_path / ".lock").exists()


@pytest.mark.slow  # two end-to-end benches as subprocesses
def test_two_benches_at_once_on_one_folder(tmp_path):
    """Two real processes: the second is refused while the first trains (before: both
    ran, and the logs held duplicated, out-of-order records)."""
    cmd = [sys.executable, "-m", "natgrad", "bench", *TINY, "--methods", "sgd",
           "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*cmd, "--epochs", "1000"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (tmp_path / ".lock").exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.run([*cmd, "--epochs", "1", "--resume"], capture_output=True,
                                text=True, env=env, timeout=120)
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert second.returncode == 2, second.stderr
    assert f"in use by pid {first.pid} on {socket.gethostname()}" in second.stderr
    keys = [(r["step"], r["kind"]) for r in
            train_module.read_log(tmp_path / "runs/sgd/seed0/log.jsonl")]
    # One writer: the step-0 evaluation first, every record once, in order.
    in_order = sorted(set(keys), key=lambda k: (k[0], k[1] == "eval"))
    assert keys[0] == (0, "eval") and keys == in_order
    assert not (tmp_path / ".lock").exists()  # released on Ctrl-C too


# ------------------------------------------------------------------ 4 and 5: the plan first
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "sgd,adam", "--lr", "adam=-1"],
         "adam: lr must be a finite number > 0, got -1"),
        (["--methods", "sgd", "--epochs", "0"], "--epochs must be a number > 0, got 0"),
        (["--methods", "kfac", "--damping", "0"],
         "kfac: damping must be a finite number > 0, got 0"),
        (["--methods", "sgd,kfac", "--damping", "-1"], "kfac: damping must be a finite"),
        (["--methods", "kfac", "--set", "T_inv=0"], "kfac: T_inv must be an integer >= 1"),
        (["--methods", "sgd", "--weight-decay", "-0.1"], "sgd: weight_decay must be"),
        (["--methods", "sgd", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--methods", ""], "--methods is empty"),
        (["--methods", " , "], "--methods is empty"),
        (["--methods", "sgd", "--seed", "-1"], r"--seed must be an integer in 0 … 2\^63-1"),
        (["--methods", "sgd", "--seed", str(2**64 - 1)], "--seed must be an integer in 0"),
        (["--methods", "sgd", "--seed", str(2**63 - 1), "--repeats", "2"], "--seed must be"),
        (["--methods", "sgd", "--interleave", "-1"], "--interleave must be an integer >= 0"),
    ],
)
def test_bad_values_fail_before_anything_runs_or_is_written(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", *HALF, "--dry-run", *argv, "--out", str(out)]) == 2
    _one_line_error(capsys, re.escape(message) if "\\" not in message else message)
    assert main(["bench", *HALF, *argv, "--out", str(out)]) == 2
    _one_line_error(capsys, re.escape(message) if "\\" not in message else message)
    assert not out.exists()


def test_a_failed_command_leaves_the_experiment_record_alone(tmp_path, capsys):
    assert _bench(tmp_path, "--methods", "sgd") == 0
    before = (tmp_path / "bench.json").read_bytes()
    assert _bench(tmp_path, "--methods", "sgd", "--epochs", "0") == 2
    assert _bench(tmp_path, "--methods", "sgd,adam", "--lr", "adam=-1") == 2
    assert (tmp_path / "bench.json").read_bytes() == before


def test_the_largest_seed_is_accepted(capsys):
    assert main(["bench", *HALF, "--methods", "sgd", "--seed", str(2**63 - 1),
                 "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["seeds"] == [2**63 - 1]


def test_bad_settings_values_fail_up_front(tmp_path, capsys):
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"settings": {"kfac": {"damping": -1}}}))
    assert main(["bench", *HALF, "--methods", "sgd,kfac", "--settings", str(settings),
                 "--dry-run"]) == 2
    _one_line_error(capsys, "kfac: damping must be a finite number > 0, got -1")
    settings.write_text(json.dumps({"settings": {"kfac": 0.1}}))
    assert main(["bench", *HALF, "--methods", "kfac", "--settings", str(settings),
                 "--dry-run"]) == 2
    _one_line_error(capsys, "settings of 'kfac' must be an object")
    settings.write_text('{"settings": {"kfac": {"lr": 0.1,}}}')
    assert main(["bench", *HALF, "--methods", "kfac", "--settings", str(settings),
                 "--dry-run"]) == 2
    _one_line_error(capsys, f"--settings file {settings} is not valid JSON \\(Expecting")


# ------------------------------------------------------------------ 6: one-line errors
def test_unreadable_checkpoint_on_resume(tmp_path, monkeypatch, capsys):
    args = ["--methods", "sgd", "--epochs", "1.5"]
    real = train_module.train_runs
    monkeypatch.setattr(bench_module, "train_runs",
                        lambda *a, **kw: real(*a, **{**kw, "stop_after_steps": 30}))
    assert _bench(tmp_path, *args) == 130
    monkeypatch.undo()
    checkpoint = tmp_path / "runs" / "sgd" / "seed0" / "checkpoint.pt"
    whole = checkpoint.read_bytes()
    for broken in (whole[: len(whole) // 2], b""):
        checkpoint.write_bytes(broken)
        assert _bench(tmp_path, *args, "--resume") == 2
        _one_line_error(capsys, f"{checkpoint} cannot be read .*delete it to restart")


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine")
    assert _bench(target, "--methods", "sgd") == 2
    _one_line_error(capsys, f"--out {target} is a file, not a folder")
    assert target.read_text() == "mine"


def test_corrupt_records_name_their_file(tmp_path, capsys):
    assert _bench(tmp_path, "--methods", "sgd") == 0
    meta = tmp_path / "runs" / "sgd" / "seed0" / "meta.json"
    meta.write_text('{"config": {"spec": "sgd",\n "seed": 0,,}')
    assert main(["report", str(tmp_path)]) == 2
    _one_line_error(capsys, f"run record {meta} is not valid JSON \\(Expecting .* line 2")
    (tmp_path / "bench.json").write_text("{")
    assert main(["report", str(tmp_path)]) == 2
    _one_line_error(capsys, f"experiment record {tmp_path / 'bench.json'} is not valid JSON")


def test_bad_dataset_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": bytes(3 * 3072), b"labels": [0, 1, 10]}, f)
    assert main(["bench", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--model", "mlp", "--methods", "sgd", "--epochs", "0.5", "--progress", "off",
                 "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "data_batch_1: (images are|images have shape)")
    assert not (tmp_path / "out").exists()


def test_tune_settings_out_is_checked_before_the_grid(tmp_path, capsys):
    assert main(["tune", *HALF, "--methods", "sgd", "--out", str(tmp_path / "t"),
                 "--settings-out", str(tmp_path)]) == 2
    _one_line_error(capsys, f"--settings-out {tmp_path} is a folder")
    assert not (tmp_path / "t").exists()


@pytest.mark.slow  # an end-to-end bench as a subprocess
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A file-size limit (the writer gets EFBIG, as it gets ENOSPC on a full disk) hits the
    first checkpoint: before, 38 lines of traceback ending in ``enforce fail at
    inline_container.cc``."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run(
        [sys.executable, "-m", "natgrad", "bench", *TINY, "--methods", "sgd", "--epochs",
         "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
        preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    checkpoint = tmp_path / "runs" / "sgd" / "seed0" / "checkpoint.pt"
    assert f"cannot write {checkpoint}: File too large" in done.stderr
    assert not checkpoint.exists() and not checkpoint.with_name("checkpoint.pt.tmp").exists()


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def half_then_full(f):
        f.write(b"ne")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    with pytest.raises(OSError, match=f"cannot write {target}: .enforce fail"):
        files.atomic_write(target, half_then_full)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["x.png"]


# ------------------------------------------------------------------ 7: fallbacks
def test_a_method_that_fell_back_is_marked(tmp_path):
    """λ = 1e-30: every inverse of the digits MLP fails (pixels that are always 0 make A
    singular), so K-FAC is plain SGD-momentum; before, its row said nothing."""
    assert _bench(tmp_path, "--methods", "sgd,kfac", "--damping", "kfac=1e-30") == 0
    meta = json.loads((tmp_path / "runs" / "kfac" / "seed0" / "meta.json").read_text())
    fb = meta["fallbacks"]
    assert fb["plain_gradient_steps"] == 11 and len(fb["plain_gradient_layers"]) >= 1
    assert any("plain gradient" in w["message"] for w in fb["warnings"])
    table = (tmp_path / "results.md").read_text()
    assert "| kfac † (fell back in 1/1) |" in table
    assert "† kfac seed 0: plain gradient on 11 of 11 steps" in table
    sgd = json.loads((tmp_path / "runs" / "sgd" / "seed0" / "meta.json").read_text())
    assert sgd["fallbacks"]["plain_gradient_steps"] == 0 and "| sgd |" in table


# ------------------------------------------------------------------ 8: atomic plots
def test_a_plot_write_that_dies_leaves_the_old_plot(tmp_path, monkeypatch):
    assert _bench(tmp_path, "--methods", "sgd") == 0
    plot = tmp_path / "plots" / "test_acc_vs_epoch.png"
    old = plot.read_bytes()
    from matplotlib.figure import Figure

    def dying_savefig(self, f, **kwargs):
        f.write(old[:10])
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(Figure, "savefig", dying_savefig)
    with pytest.raises(KeyboardInterrupt):
        bench_module.write_report(tmp_path)
    assert plot.read_bytes() == old
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_stale_temporaries_are_removed(tmp_path, capsys):
    assert _bench(tmp_path, "--methods", "sgd") == 0
    run = tmp_path / "runs" / "sgd" / "seed0"
    stale = [run / "checkpoint.pt.tmp", run / "checkpoint.tmp", run / "meta.json.tmp",
             tmp_path / "plots" / "test_acc_vs_time.png.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    assert _bench(tmp_path, "--methods", "sgd", "--resume") == 0
    assert not any(p.exists() for p in stale)


# ------------------------------------------------------------------ 9: tune
def test_tune_never_records_a_diverged_point(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["tune", *HALF, "--methods", "sgd,adam", "--lrs", "1e4", "--weight-decays",
                 "0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    saved = json.loads((out / "settings.json").read_text())
    assert saved["settings"] == {} and saved["unconverged"] == ["sgd", "adam"]
    assert all(r["train_loss"] is None for r in saved["results"])
    assert "no point of sgd converged" in captured.err
    assert "| sgd | none: no point converged |" in captured.out


# ------------------------------------------------------------------ 10: smaller
def test_a_torn_line_in_a_log_is_reported(tmp_path, capsys):
    assert _bench(tmp_path, "--methods", "sgd") == 0
    log = tmp_path / "runs" / "sgd" / "seed0" / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    log.write_text("".join(lines))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert f"Torn log lines (skipped): {log} line 2." in (tmp_path / "results.md").read_text()
    assert f"{log} line 2" in out.err


def test_skipped_peers_are_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M, "missing_reason",
                        lambda name: f"{name}: heavyball is not installed (pip install x)")
    assert _bench(tmp_path, "--methods", "sgd,soap") == 0
    assert capsys.readouterr().err.count("skipping soap") == 1


def test_progress_under_minutes_has_a_total_and_an_eta(tmp_path, capsys):
    assert main(["bench", *TINY, "--methods", "sgd,adam", "--minutes", "0.005",
                 "--progress", "on", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"interleaved: +\d+%\|.*\| \[[\d:]+<[\d:?]+", err), err[-500:]


def test_the_machine_load_is_recorded_through_the_run(tmp_path):
    assert _bench(tmp_path, "--methods", "sgd", "--evals-per-epoch", "4") == 0
    meta = json.loads((tmp_path / "runs" / "sgd" / "seed0" / "meta.json").read_text())
    evals = [r for r in train_module.read_log(tmp_path / "runs/sgd/seed0/log.jsonl")
             if r["kind"] == "eval"]
    # Step 0, steps 6 and 11 (the end of the half epoch): one sample at each evaluation.
    assert meta["load_average"]["samples"] == len(evals) == 3
    assert meta["load_average"]["min"] <= meta["load_average"]["mean"] <= (
        meta["load_average"]["max"])
    assert re.search(r"at the start, [\d.]+–[\d.]+ \(mean [\d.]+\) during the runs",
                     (tmp_path / "results.md").read_text())


def test_an_experiment_matches_itself_through_json():
    """A tuple-valued setting (``--set soap:betas=...`` from a settings file) reads back
    from ``bench.json`` as a list: still the same experiment."""
    from natgrad.experiments.bench import _differences

    old = {"hyperparameters": {"soap": {"betas": [0.9, 0.95]}}, "epochs": 1, "targets": [0.9]}
    new = {"hyperparameters": {"soap": {"betas": (0.9, 0.95)}}, "epochs": 1, "targets": [0.8]}
    assert _differences(old, new) == []  # targets only change the report
    assert _differences(old, {**new, "epochs": 2}) == ["epochs"]


@pytest.mark.parametrize("argv, message", [
    (["--lrs", "-0.1"], "sgd: lr must be a finite number > 0, got -0.1"),
    (["--dampings", "0"], "--dampings must be > 0, got 0"),
    (["--weight-decays", "-1"], "--weight-decays must be >= 0, got -1"),
])
def test_tune_checks_every_grid_point_first(tmp_path, capsys, argv, message):
    assert main(["tune", *HALF, "--methods", "sgd,kfac", *argv, "--out",
                 str(tmp_path / "t")]) == 2
    _one_line_error(capsys, re.escape(message))
    assert not (tmp_path / "t").exists()


def test_a_plan_from_typed_options_without_the_command_line():
    from natgrad.experiments.plan import PlanOptions, build_plan

    plan = build_plan(PlanOptions(dataset="digits", model="mlp", methods=["sgd", "kfac"],
                                  damping=["kfac=0.2"], epochs=0.5), default_epochs=3)
    assert [m.name for m in plan.methods] == ["sgd", "kfac"] and plan.epochs == 0.5
    assert plan.hyperparameters["kfac"]["damping"] == 0.2 and plan.interleave == 10
    with pytest.raises(ValueError, match="kfac: damping must be a finite number > 0"):
        build_plan(PlanOptions(dataset="digits", model="mlp", methods=["kfac"],
                               damping=["-1"]), default_epochs=1)
