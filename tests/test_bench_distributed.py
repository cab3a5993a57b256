"""``natgrad bench`` on 2 processes (gloo on loopback): the one-process run, split in two.

- ``natgrad bench --nproc 2`` (through torchrun) writes one set of files, from rank 0,
  whose numbers equal the one-process bench's to float32 rounding, and records the
  process count;
- a 2-process run interrupted mid-epoch and resumed from rank 0's checkpoint logs exactly
  what the uninterrupted 2-process run logs;
- a bad ``--nproc`` is refused before any worker starts;
- a worker that dies stops the whole job with a message, and Ctrl-C stops every worker
  with one message (no process is left behind).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, spawn_and_wait

from natgrad.cli import main
from natgrad.experiments.data import load
from natgrad.experiments.train import RunConfig, read_log, train_run
from natgrad.experiments.workers import Workers, worker_argv

TINY = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--progress", "off",
        "--quiet", "--epochs", "1", "--set", "T_inv=5"]
METHODS = "sgd,kfac,skfac,tkfac"
DEADLINE_S = 240


@pytest.fixture(scope="module")
def two_benches(tmp_path_factory):
    """The same bench on 1 process (in this process) and on 2 (``--nproc 2``)."""
    root = tmp_path_factory.mktemp("nproc")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", *TINY, "--methods", METHODS, "--out", str(root / "one")]) == 0
    finally:
        torch.set_num_threads(old)
    done = subprocess.run(
        [sys.executable, "-m", "natgrad", "bench", *TINY, "--methods", METHODS,
         "--out", str(root / "two"), "--nproc", "2"],
        capture_output=True, text=True, timeout=DEADLINE_S, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "one", root / "two", done.stdout


@pytest.mark.slow  # end-to-end bench on spawned workers
def test_nproc_2_equals_one_process(two_benches):
    one, two, _ = two_benches
    for spec in METHODS.split(","):
        a = read_log(one / "runs" / spec / "seed0" / "log.jsonl")
        b = read_log(two / "runs" / spec / "seed0" / "log.jsonl")
        assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b], spec
        n_test = 360  # digits: 20 % of 1797 images
        # float32: the two halves' gradients and factors are summed in another order than
        # the whole batch's, and 22 steps through the inverses amplify that to ~1e-4
        # (test_distributed checks the same equivalence in float64 to 1e-9).
        for ra, rb in zip(a, b):
            if ra["train_loss"] is not None:
                assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-3), (spec, ra)
            if ra["kind"] == "eval":
                assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-3), (spec, ra)
                assert abs(rb["test_acc"] - ra["test_acc"]) <= 1 / n_test + 1e-12, (spec, ra)
        meta = json.loads((two / "runs" / spec / "seed0" / "meta.json").read_text())
        assert meta["config"]["processes"] == 2 and meta["status"] == "done"


@pytest.mark.slow  # end-to-end bench on spawned workers
def test_nproc_2_writes_one_set_of_files(two_benches):
    _, two, stdout = two_benches
    assert stdout.count("# natgrad bench: mlp on digits") == 1  # rank 0 alone prints
    assert "batch 64 (32 on each of 2 processes)" in (two / "results.md").read_text()
    assert json.loads((two / "bench.json").read_text())["processes"] == 2
    for spec in METHODS.split(","):
        records = read_log(two / "runs" / spec / "seed0" / "log.jsonl")
        keys = [(r["kind"], r["step"]) for r in records]
        assert len(keys) == len(set(keys)) > 3, spec  # written once, not once per worker


# --------------------------------------------------------------------- resume on 2 workers
def _resume_worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    workers = Workers.from_env("cpu", timeout_s=60)
    data = load("digits")
    cfg = RunConfig(spec="kfac", hyperparameters={"lr": 0.05, "damping": 0.1,
                                                  "kl_clip": 1e-3, "T_inv": 5},
                    dataset="digits", model="mlp", batch_size=64, epochs=2, processes=2)
    out = Path(outdir)
    summaries = {"straight": train_run(cfg, data, out / "straight", progress=False,
                                       quiet=True, workers=workers)}
    try:
        train_run(cfg, data, out / "resumed", progress=False, quiet=True, workers=workers,
                  stop_after_steps=30)  # 22 steps per epoch: the checkpoint is at step 22
    except KeyboardInterrupt:
        pass
    summaries["resumed"] = train_run(cfg, data, out / "resumed", resume=True, progress=False,
                                     quiet=True, workers=workers)
    torch.save(summaries, out / f"summary{rank}.pt")
    workers.close()


@pytest.mark.slow  # end-to-end bench on spawned workers
def test_two_process_resume_is_exact(tmp_path):
    spawn_and_wait(_resume_worker, (free_port(), str(tmp_path)), 2, DEADLINE_S,
                   "2-worker resume")
    s0, s1 = (torch.load(tmp_path / f"summary{r}.pt", weights_only=False) for r in (0, 1))
    assert s0 == s1  # every worker returns the same summary (rank 0's clock)
    assert s0["straight"]["steps"] == s0["resumed"]["steps"] == 44

    def records(name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"}
                for r in read_log(tmp_path / name / "log.jsonl")]

    assert records("resumed") == records("straight")


# --------------------------------------------------------------------- bad input
def test_bad_nproc_is_refused_before_starting(tmp_path, capsys):
    assert main(["bench", *TINY, "--nproc", "0", "--out", str(tmp_path)]) == 2
    assert "--nproc must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", *TINY[:4], "--batch-size", "63", *TINY[6:], "--nproc", "2",
                 "--out", str(tmp_path)]) == 2
    assert "batch_size 63 does not split evenly over 2 processes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_worker_argv_drops_nproc():
    argv = worker_argv(["bench", "--nproc", "3", "--out", "x", "--nproc=3", "--seed", "1"])
    assert argv == ["bench", "--out", "x", "--seed", "1"]


# --------------------------------------------------------------------- stopping the job
def _start_long_bench(out: Path) -> subprocess.Popen:
    """A 2-process bench far longer than the test, in its own session (so a signal to its
    process group is what Ctrl-C in a terminal sends), returned once training runs."""
    job = subprocess.Popen(
        [sys.executable, "-m", "natgrad", "bench", *TINY[:-4], "--epochs", "500",
         "--methods", "sgd", "--out", str(out), "--nproc", "2"],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    log = out / "runs" / "sgd" / "seed0" / "log.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.stat().st_size > 0):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    return job


def _workers_of(job: subprocess.Popen) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(job.pid), "-o", "pid="], capture_output=True,
                         text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.slow  # end-to-end bench on spawned workers
def test_a_dying_worker_stops_the_job_with_a_message(tmp_path):
    job = _start_long_bench(tmp_path)
    workers = _workers_of(job)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGKILL
    assert "worker 1 of 2 ended with signal 9; stopping the others" in err
    assert "Traceback" not in err  # rank 0, which lost its peer, says nothing more
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


@pytest.mark.slow  # end-to-end bench on spawned workers
def test_ctrl_c_stops_every_worker_and_says_so_once(tmp_path):
    job = _start_long_bench(tmp_path)
    workers = _workers_of(job)
    os.killpg(job.pid, signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    assert err.count("interrupted; run the same command with --resume") == 1
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
