"""The ``natgrad`` CLI end to end on digits (tiny budgets), resume after interruption,
``--help`` everywhere, bad input, tune → settings → bench, report, and the pieces the
table is built from (schedules, hyperparameter layering, time to target)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from natgrad.cli import main
from natgrad.experiments import bench as bench_module
from natgrad.experiments import methods as M
from natgrad.experiments import train as train_module
from natgrad.experiments.results import Run, Stat, summarise, time_to_target
from natgrad.experiments.schedule import LRSchedule, parse_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--progress", "off",
        "--quiet"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One tiny bench shared by several tests: 3 methods × 2 seeds, 1 epoch of digits."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", *TINY, "--methods", "sgd,adam,kfac", "--epochs", "1",
                 "--repeats", "2", "--targets", "50,80", "--out", str(out)])
    assert code == 0
    return out


def test_bench_writes_table_plots_and_logs(bench_dir, capsys):
    table = (bench_dir / "results.md").read_text()
    for spec in ("sgd", "adam", "kfac"):
        assert f"| {spec} | 2 |" in table
    assert "t→50% (s)" in table and "t→80% (s)" in table and " ± " in table
    with open(bench_dir / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"sgd", "adam", "kfac"}
    assert float(rows["sgd"]["ms_ratio_sgd"]) == 1.0
    assert float(rows["sgd"]["test_acc_mean"]) > 0.7  # SGD-momentum learns digits in 1 epoch
    for name in ("test_acc_vs_epoch", "test_acc_vs_time", "train_loss_vs_epoch",
                 "train_loss_vs_time"):
        assert (bench_dir / "plots" / f"{name}.png").read_bytes()[:8] == PNG
    records = [json.loads(line) for line in
               (bench_dir / "runs" / "kfac" / "seed1" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 11, 22]  # before, mid-epoch, end (22 steps/epoch)
    for r in evals[1:]:
        assert set(r) == {"kind", "step", "epoch", "time", "train_loss", "test_loss",
                          "test_acc", "lr"}
        assert r["lr"] == 0.05 and 0 <= r["test_acc"] <= 1
    assert [r["step"] for r in records if r["kind"] == "train"] == [10, 20]
    assert [r["time"] for r in evals] == sorted(r["time"] for r in evals)
    meta = json.loads((bench_dir / "runs" / "kfac" / "seed1" / "meta.json").read_text())
    assert meta["status"] == "done" and meta["method_config"]["T_inv"] > 0
    assert meta["summary"]["test_acc"] == evals[-1]["test_acc"]


def test_report_rebuilds_the_same_table(bench_dir, capsys):
    before = (bench_dir / "results.md").read_text()
    (bench_dir / "results.md").unlink()
    for png in (bench_dir / "plots").iterdir():
        png.unlink()
    assert main(["report", str(bench_dir)]) == 0
    assert (bench_dir / "results.md").read_text() == before
    assert len(list((bench_dir / "plots").glob("*.png"))) == 4
    assert main(["report", str(bench_dir), "--targets", "0.6"]) == 0
    assert "t→60% (s)" in capsys.readouterr().out


def test_every_method_sees_the_same_batches(tmp_path, monkeypatch):
    seen: dict[str, list[list[int]]] = {}
    original = train_module._Run.train_step
    now = {}

    def recording(self):
        seen.setdefault(self.cfg.spec, []).append([])
        now["spec"] = self.cfg.spec
        return original(self)

    from natgrad.experiments.data import ImageData

    batch = ImageData.train_batch

    def train_batch(self, index, generator=None):
        x, y = batch(self, index, generator)
        seen[now["spec"]][-1] = [*index.tolist(), float(x.sum())]
        return x, y

    monkeypatch.setattr(train_module._Run, "train_step", recording)
    monkeypatch.setattr(ImageData, "train_batch", train_batch)
    assert main(["bench", *TINY, "--methods", "sgd,kfac", "--epochs", "1.5",
                 "--no-augment", "--out", str(tmp_path)]) == 0
    assert len(seen["sgd"]) == 33 and seen["sgd"] == seen["kfac"]


def test_evaluation_is_not_on_the_training_clock(tmp_path, monkeypatch):
    pause = 0.3
    evaluate = train_module.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(pause)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
    cfg = train_module.RunConfig(spec="sgd", hyperparameters={"lr": 0.05}, dataset="digits",
                                 model="mlp", batch_size=64, epochs=1, evals_per_epoch=4)
    from natgrad.experiments.data import load

    start = time.perf_counter()
    summary = train_module.train_run(cfg, load("digits"), tmp_path, quiet=True)
    wall = time.perf_counter() - start
    # 5 evaluations (before + 4) sleep 1.5 s in all; none of it may be on the clock.
    assert wall - summary["train_time"] >= 5 * pause


def test_resume_after_interruption_gives_identical_numbers(tmp_path, monkeypatch, capsys):
    args = [*TINY, "--methods", "kfac", "--epochs", "3", "--evals-per-epoch", "1"]
    assert main(["bench", *args, "--out", str(tmp_path / "straight")]) == 0
    # Interrupt in the middle of epoch 3 (after step 50 of 66), then resume.
    real = train_module.train_runs
    monkeypatch.setattr(bench_module, "train_runs",
                        lambda *a, **kw: real(*a, **{**kw, "stop_after_steps": 50}))
    assert main(["bench", *args, "--out", str(tmp_path / "resumed")]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(bench_module, "train_runs", real)
    assert main(["bench", *args, "--resume", "--out", str(tmp_path / "resumed")]) == 0

    def final(name):
        run = tmp_path / name / "runs" / "kfac" / "seed0"
        meta = json.loads((run / "meta.json").read_text())["summary"]
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
        return meta, records, ckpt

    (m1, log1, c1), (m2, log2, c2) = final("straight"), final("resumed")
    for key in ("steps", "test_acc", "test_loss", "final_train_loss"):
        assert m1[key] == m2[key]
    strip = [{k: v for k, v in r.items() if k != "time"} for r in log1]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in log2]
    for name, tensor in c1["model"].items():
        assert torch.equal(tensor, c2["model"][name]), name
    assert c1["preconditioner"]["steps"] == c2["preconditioner"]["steps"] == 66
    # A finished run is kept as is on --resume.
    stamp = (tmp_path / "resumed" / "runs" / "kfac" / "seed0" / "log.jsonl").stat().st_mtime_ns
    assert main(["bench", *args, "--resume", "--out", str(tmp_path / "resumed")]) == 0
    assert (tmp_path / "resumed" / "runs" / "kfac" / "seed0" / "log.jsonl").stat(
    ).st_mtime_ns == stamp


def test_resume_refuses_other_settings(tmp_path, capsys):
    args = [*TINY, "--methods", "sgd", "--epochs", "0.5", "--out", str(tmp_path)]
    assert main(["bench", *args]) == 0
    before = (tmp_path / "bench.json").read_bytes()
    assert main(["bench", *args, "--resume", "--lr", "0.1"]) == 2
    assert "holds another experiment (it differs in: hyperparameters)" in (
        capsys.readouterr().err)
    assert (tmp_path / "bench.json").read_bytes() == before  # the refusal wrote nothing


@pytest.mark.parametrize("argv", [[], ["bench"], ["tune"], ["report"]])
def test_help_works_for_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: natgrad")
    if argv == ["bench"]:
        for option in ("--dataset", "--data-dir", "--model", "--methods", "--epochs",
                       "--minutes", "--batch-size", "--targets", "--repeats", "--seed",
                       "--out", "--resume", "--preset", "--settings"):
            assert option in out


def test_module_entry_point_without_a_terminal(tmp_path):
    """``python -m natgrad`` with pipes for stdin/stdout/stderr and forced progress bars."""
    result = subprocess.run(
        [sys.executable, "-m", "natgrad", "bench", "--dataset", "digits", "--model", "mlp",
         "--methods", "adam", "--epochs", "0.5", "--progress", "on", "--out", str(tmp_path)],
        stdin=subprocess.PIPE, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "| adam | 1 |" in result.stdout
    assert "adam" in result.stderr  # progress and per-evaluation lines go to stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "sgd,nope"], "unknown method 'nope'.*known methods:.*kfac"),
        (["--methods", "sgd", "--lr", "kfac=0.1"], "override for 'kfac'.*not among"),
        (["--methods", "sgd", "--set", "sgd:damping=1"], "sgd has no hyperparameter 'damping'"),
        (["--methods", "sgd", "--lr", "sgd=fast"], "--lr expects a number"),
        (["--methods", "sgd", "--targets", "150"], "--targets must be accuracies"),
        (["--methods", "sgd", "--lr-schedule", "step"], "needs every=EPOCHS"),
        (["--methods", "sgd", "--lr-schedule", "cosine", "--minutes", "1"], "needs --epochs"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], "cifar-10-batches-py/data_batch_1"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["bench", "--model", "mlp", "--progress", "off", "--quiet",
                 "--out", str(tmp_path / "out"), *argv])
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_tune_writes_settings_that_bench_reads(tmp_path, capsys):
    settings = tmp_path / "best.json"
    assert main(["tune", *TINY, "--methods", "sgd,kfac", "--lrs", "0.003,0.1",
                 "--dampings", "0.01", "--weight-decays", "0", "--epochs", "0.5",
                 "--out", str(tmp_path / "tune"), "--settings-out", str(settings)]) == 0
    saved = json.loads(settings.read_text())
    assert len(saved["results"]) == 4 and "training loss" in saved["criterion"]
    for spec in ("sgd", "kfac"):
        mine = [r for r in saved["results"] if r["spec"] == spec]
        best = min(mine, key=lambda r: r["train_loss"])
        assert saved["settings"][spec] == best["hyperparameters"]
    assert saved["settings"]["kfac"]["damping"] == 0.01
    capsys.readouterr()
    assert main(["bench", *TINY, "--methods", "sgd,kfac", "--settings", str(settings),
                 "--lr", "sgd=0.02", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["hyperparameters"]["sgd"]["lr"] == 0.02  # command line beats settings
    assert plan["hyperparameters"]["kfac"]["lr"] == saved["settings"]["kfac"]["lr"]


def test_presets_set_paper_settings(tmp_path, capsys):
    assert main(["bench", "--preset", "tekfac", "--dataset", "svhn", "--methods", "sgd,kfac",
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["batch_size"] == 128 and plan["schedule"] == "step:every=20,gamma=0.1"
    assert plan["hyperparameters"]["kfac"]["lr"] == 1e-3
    assert main(["bench", "--preset", "ekfac", "--methods", "sgd,kfac", "--batch-size", "32",
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["batch_size"] == 32  # the command line beats the preset
    shown = plan["hyperparameters"]["kfac"]
    expected = {
        "lr": 0.01, "weight_decay": 3e-4, "damping": 0.03, "decay": 0.95, "T_cov": 10,
        "T_inv": 100, "kl_clip": 1e-2, "inverse": "factored", "step_size": "lr",
        "lm_damping": False, "warm_start": []}  # config defaults shown too
    assert {k: shown[k] for k in expected} == expected
    assert any("T_s=10 ignored" in n for n in plan["notes"])  # K-FAC has no T_s


def test_default_methods_follow_the_registry(monkeypatch):
    import natgrad

    monkeypatch.setitem(natgrad.METHODS, "kfac2", natgrad.METHODS["kfac"])
    specs = M.default_specs()
    assert specs[:2] == ["sgd", "adam"] and "kfac2" in specs
    assert specs[2:2 + len(natgrad.METHODS)] == list(natgrad.METHODS)


def test_missing_peers_are_skipped_with_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(M, "missing_reason",
                        lambda name: f"{name}: heavyball is not installed (pip install x)")
    methods, skipped = M.select(["sgd", "soap", "shampoo"])
    assert [m.name for m in methods] == ["sgd"]
    assert skipped == [f"skipping {n}: heavyball is not installed (pip install x)"
                       for n in ("soap", "shampoo")]
    assert main(["bench", *TINY, "--methods", "soap", "--epochs", "0.1",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "skipping soap: heavyball is not installed" in err and "no method left" in err


def test_overrides_and_layers():
    methods, _ = M.select(["sgd", "adam", "kfac+adam"])
    overrides = M.parse_overrides("--lr", "lr", ["0.2", "kfac+adam=0.003"])
    overrides.setdefault(None, {}).update(M.parse_overrides("--damping", "damping", ["0.1"])[None])
    for target, hp in M.parse_overrides("--set", None, ["kfac+adam:T_inv=20,kl_clip=none"]
                                        ).items():
        overrides.setdefault(target, {}).update(hp)
    hp, notes = M.merge_hyperparameters(
        methods, preset={"kfac+adam": {"lr": 1.0, "T_cov": 5, "T_s": 3}},
        settings={"adam": {"lr": 0.5}}, overrides=overrides)
    assert hp["sgd"] == {"lr": 0.2, "weight_decay": 0.0}
    assert hp["adam"] == {"lr": 0.2, "weight_decay": 0.0}
    assert hp["kfac+adam"] == {"lr": 0.003, "weight_decay": 0.0, "T_cov": 5, "damping": 0.1,
                               "T_inv": 20, "kl_clip": None}
    assert notes == ["kfac+adam: preset value T_s=3 ignored (no such hyperparameter)"]
    assert M.resolve("KFAC+sgd").name == "kfac"


def test_schedules():
    step = parse_schedule("step:every=2,gamma=0.5")
    assert [step.factor(s, 10, None) for s in (0, 19, 20, 40)] == [1, 1, 0.5, 0.25]
    by_steps = LRSchedule("step", every_steps=16_000)
    assert by_steps.factor(15_999, 391, None) == 1 and by_steps.factor(16_000, 391, None) == 0.1
    cos = parse_schedule("cosine:warmup=1")
    assert cos.factor(0, 10, 110) == pytest.approx(0.1)
    assert cos.factor(9, 10, 110) == pytest.approx(1.0)
    assert cos.factor(60, 10, 110) == pytest.approx(0.5)
    assert cos.factor(110, 10, 110) == pytest.approx(0.0)
    assert str(step) == "step:every=2,gamma=0.5"
    with pytest.raises(ValueError, match="schedule kind must be one of"):
        parse_schedule("linear")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_schedule("step:each=3")


def _run(spec, seed, times_accs, status="done", ms=10.0):
    evals = [{"time": t, "test_acc": a, "epoch": i, "train_loss": 1.0}
             for i, (t, a) in enumerate(times_accs)]
    summary = {"test_acc": times_accs[-1][1], "test_loss": 0.5, "ms_per_iter": ms,
               "train_time": times_accs[-1][0]}
    return Run(spec, seed, {"status": status, "summary": summary,
                            "config": {"spec": spec, "seed": seed}}, evals)


def test_time_to_target_and_ratios():
    runs = [
        _run("sgd", 0, [(0, 0.1), (10, 0.85), (20, 0.9)]),
        _run("sgd", 1, [(0, 0.1), (12, 0.88), (22, 0.9)]),
        _run("adam", 0, [(0, 0.1), (8, 0.9), (16, 0.91)], ms=5.0),
        _run("adam", 1, [(0, 0.1), (9, 0.7), (18, 0.86)], ms=5.0),
        _run("kfac", 0, [(0, 0.1), (4, 0.89), (8, 0.92)], ms=20.0),
        _run("kfac", 1, [(0, 0.1), (6, 0.9), (12, 0.93)], ms=20.0),
    ]
    assert time_to_target(runs[0].evals, 0.88) == 20
    assert time_to_target(runs[0].evals, 0.95) is None
    rows = {r.spec: r for r in summarise(runs, [0.88], order=["sgd", "adam", "kfac"])}
    assert rows["sgd"].to_target[0.88].values == [20, 12]
    assert rows["adam"].to_target[0.88].text(".1f") == "8.0 ± 0.0 (1/2)"
    # Adam reached 88% in only one seed, so the best first-order time is SGD's mean (16 s).
    assert rows["kfac"].target_ratio[0.88] == pytest.approx(5 / 16)
    assert rows["kfac"].ms_ratio == pytest.approx(2.0)
    assert rows["kfac"].epochs_to[0.88].values == [1, 1]
    assert rows["sgd"].epochs_to[0.88].values == [2, 1]
    assert Stat([1.0, 3.0], 2).text(".1f") == "2.0 ± 1.4"
