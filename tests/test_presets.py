"""Paper presets: each reproduces its paper's stated settings (shown by ``--dry-run``), and
every reproduction command the docs list runs as a dry run."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from natgrad.cli import main
from natgrad.experiments.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def dry_run(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) == 0
    return json.JSONDecoder().raw_decode(capsys.readouterr().out)[0]  # tune adds a line


def test_smkfac_preset_is_liu_gao_wang_2021(capsys):
    plan = dry_run(capsys, "bench", "--preset", "smkfac")
    assert (plan["dataset"], plan["model"], plan["batch_size"]) == ("cifar10", "resnet20", 128)
    # 39,100 iterations: 100 epochs of ceil(50,000 / 128) = 391 batches
    assert plan["epochs"] * math.ceil(50_000 / 128) == 39_100
    assert plan["schedule"] == "step:every_steps=16000,gamma=0.1"  # × 0.1 every 16k
    hp = plan["hyperparameters"]
    assert hp["sgd"]["lr"] == 0.03 and hp["sgd"]["weight_decay"] == 0.0
    for spec in ("kfac", "smkfac"):
        assert hp[spec]["kl_clip"] is None  # the paper does not clip
        assert (hp[spec]["lr"], hp[spec]["damping"], hp[spec]["T_cov"], hp[spec]["T_inv"]) == (
            1e-3, 1e-3, 10, 100)
    assert (hp["smkfac"]["k"], hp["smkfac"]["alpha"], hp["smkfac"]["beta"]) == (10, 0.1, 0.1)
    assert hp["smkfac"]["reading"] == "paper"


def test_ekfac_preset_is_xu_2021(capsys):
    plan = dry_run(capsys, "bench", "--preset", "ekfac")
    assert (plan["dataset"], plan["model"], plan["batch_size"], plan["epochs"]) == (
        "cifar10", "resnet50", 64, 100)
    hp = plan["hyperparameters"]
    assert hp["ekfac+adam"]["scale_rule"] == "batch" and hp["ekfac"]["kl_clip"] == 1e-2
    assert (hp["ekfac+adam"]["lr"], hp["ekfac+adam"]["weight_decay"]) == (0.003, 1e-3)
    grid = plan["paper"]["grid"]
    assert grid["damping"] == [0.03, 0.001, 0.003] and grid["lr"] == [0.03, 0.01, 0.003]


def test_skfac_preset_is_tang_et_al_2021(capsys):
    plan = dry_run(capsys, "bench", "--preset", "skfac")
    assert (plan["dataset"], plan["model"], plan["batch_size"]) == ("cifar10", "resnet34", 32)
    assert plan["schedule"].startswith("cosine")
    hp = plan["hyperparameters"]
    for spec in ("kfac", "skfac"):
        assert hp[spec]["kl_clip"] is None
        assert (hp[spec]["damping"], hp[spec]["T_cov"], hp[spec]["T_inv"]) == (1e-3, 20, 200)
    assert hp["skfac"]["reading"] == "algorithm2"
    assert plan["paper"]["grid"]["spatial_samples"] == [1, 2, 4, 8]
    commands = " ".join(r["command"] for r in plan["paper"]["reproduce"])
    for s in (1, 2, 4, 8):
        assert f"--set skfac:spatial_samples={s}" in commands


@pytest.mark.parametrize("name", ["tekfac", "tkfac"])
def test_tekfac_and_tkfac_presets_are_gao_et_al_2020(capsys, name):
    plan = dry_run(capsys, "bench", "--preset", name)
    assert (plan["dataset"], plan["model"], plan["batch_size"]) == ("cifar10", "resnet20", 128)
    assert plan["schedule"] == "step:every=40,gamma=0.1"
    assert all(
        hp.get("kl_clip", None) is None and hp["weight_decay"] == 0.0
        for hp in plan["hyperparameters"].values()
    )
    grid = plan["paper"]["grid"]
    assert grid["trace_floor"] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    assert len(grid["lr"]) == 10 and len(grid["damping"]) == 10
    svhn = dry_run(capsys, "bench", "--preset", name, "--dataset", "svhn")
    assert svhn["schedule"] == "step:every=20,gamma=0.1" and svhn["epochs"] == 60


def test_command_line_beats_the_presets_dataset_model_and_budget(capsys):
    plan = dry_run(capsys, "bench", "--preset", "smkfac", "--dataset", "digits", "--model",
                   "cnn", "--epochs", "2")
    assert (plan["dataset"], plan["model"], plan["epochs"]) == ("digits", "cnn", 2)
    tune = dry_run(capsys, "tune", "--preset", "ekfac", "--methods", "kfac")
    assert tune["epochs"] == 2  # a tuning run keeps its short budget


def reproduction_commands() -> list[tuple[str, str]]:
    return [
        (p.name, r.command)
        for p in PRESETS.values()
        for r in p.reproduce
        if r.command.startswith(("natgrad bench", "natgrad tune"))
    ]


@pytest.mark.parametrize("preset,command", reproduction_commands())
def test_every_reproduction_command_runs_as_a_dry_run(capsys, tmp_path, preset, command):
    argv = shlex.split(command.replace("THETA", "0.01"))[1:]
    argv = ["cpu" if a == "cuda" else a for a in argv]  # --device cuda is checked up front
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    plan = dry_run(capsys, *argv)
    assert plan["preset"] == preset


def test_docs_list_every_reproduction_command():
    text = (ROOT / "docs" / "reproduce.md").read_text(encoding="utf-8")
    for preset in PRESETS.values():
        assert f"--preset {preset.name}" in text
        for r in preset.reproduce:
            assert r.command in text, r.command
