"""One training run: a method on a model and dataset, on a budget, logged and checkpointed.

Fairness rules every run of a benchmark shares:
- the model is initialised from ``torch.manual_seed(seed)`` (same weights for every method);
- one data generator seeded with ``seed`` draws each epoch's order and the augmentation, so
  every method sees the same batches in the same order;
- the clock counts training steps only (batch preparation, forward, backward,
  preconditioner, optimizer); evaluation, logging and checkpointing are excluded.

On ``W`` processes (:class:`~natgrad.experiments.workers.Workers`) the run is the same run:
``batch_size`` is the global batch, each worker trains on its ``1/W`` share of the batch
the one-process run would draw, evaluation is split over the workers, and the clock is rank
0's (every worker adopts it each step, so budgets end on the same step everywhere). Rank 0
alone writes the files below; a checkpoint serves every worker.

Several runs in one process (:func:`train_runs`) go one after another or take turns a
few steps at a time; each owns its model, optimizer, preconditioner, data generator, RNG
state and clock, so its numbers do not depend on the order.

Files in the run folder (:class:`~natgrad.experiments.run_folder.RunFolder`):
``meta.json`` (config, status, fallbacks, load average, summary), ``log.jsonl`` (one JSON
object per line: ``kind`` = ``"train"`` every ``log_every`` steps or ``"eval"``, with
``step``, ``epoch``, ``time`` (training seconds), ``train_loss``, ``lr`` and, for evals,
``test_loss`` and ``test_acc``), ``checkpoint.pt`` (written at every epoch end; resuming
from it reproduces the uninterrupted run exactly).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import files
from . import run_health as health
from .data import ImageData
from .methods import resolve
from .models import build_model, count_parameters
from .run_folder import RunFolder
from .schedule import LRSchedule
from .workers import Workers, check_batch

__all__ = ["RunConfig", "train_run", "train_runs", "evaluate", "read_log", "ConfigMismatch",
           "MAX_SEED"]

CHECKPOINT_VERSION = 1
#: Seeds are 0 … 2⁶³ − 1 (what ``torch.manual_seed`` takes without wrapping around).
MAX_SEED = 2**63 - 1


class ConfigMismatch(ValueError):
    """``--resume`` found a run folder written with other settings."""


@dataclass
class RunConfig:
    """Everything that determines one run's numbers.

    Attributes:
        spec: method spec (``"kfac"``, ``"ekfac+adam"``, ``"sgd"``, ``"soap"``...).
        hyperparameters: ``lr``, ``weight_decay`` and method fields (see ``methods.py``).
        dataset, model: names from :data:`~natgrad.experiments.data.DATASETS` and
            :data:`~natgrad.experiments.models.MODELS`.
        batch_size: training mini-batch size (the last incomplete batch of an epoch is
            dropped, so every step sees the same batch size).
        epochs: epoch budget (fractions allowed) or ``None``.
        minutes: training-clock budget or ``None``; with both, whichever ends first.
        seed: model initialisation, data order and augmentation.
        evals_per_epoch: test-set evaluations per epoch (evenly spaced; the last at the
            epoch's end), besides one before training and one at the end.
        log_every: steps between ``"train"`` log records.
        schedule: learning-rate schedule (:class:`LRSchedule` fields).
        augment: training augmentation on/off; ``None`` keeps the dataset's default.
        eval_batch_size: batch size of evaluation (no effect on numbers).
        device: torch device to train on (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); on
            several processes ``"cuda"`` means each worker's ``cuda:LOCAL_RANK``.
        processes: number of worker processes ``W`` (``batch_size`` is split over them).
    """

    spec: str
    hyperparameters: dict[str, Any]
    dataset: str
    model: str
    batch_size: int = 128
    epochs: float | None = None
    minutes: float | None = None
    seed: int = 0
    evals_per_epoch: int = 2
    log_every: int = 10
    schedule: dict[str, Any] = field(default_factory=lambda: LRSchedule().as_dict())
    augment: bool | None = None
    eval_batch_size: int = 1000
    device: str = "cpu"
    processes: int = 1

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be a torch device name like 'cpu' or 'cuda', "
                             f"got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if self.epochs is None and self.minutes is None:
            raise ValueError("a run needs a budget: epochs or minutes (or both)")
        for name in ("epochs", "minutes"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in 0 … 2^63-1, got {self.seed!r}")
        for name in ("batch_size", "evals_per_epoch", "log_every", "eval_batch_size",
                     "processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000,
             device: torch.device | str = "cpu",
             workers: Workers | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (0–1) on the test set, in eval mode.

    With several ``workers`` each evaluates its shard of the test set with rank 0's
    buffers, and the sums are combined: every worker returns the same numbers.
    """
    workers = workers or Workers.single()
    workers.sync_buffers(model)
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    shard = workers.shard(len(data.y_test))
    for start in range(shard.start, shard.stop, batch_size):
        x, y = data.test_batch(torch.arange(start, min(shard.stop, start + batch_size)))
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    loss_sum, correct = workers.sum(torch.tensor([loss_sum, correct], dtype=torch.float64))
    n = len(data.y_test)
    return loss_sum.item() / n, round(correct.item()) / n


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All whole records of a ``log.jsonl`` (torn lines are skipped; :func:`files.read_log`
    says which)."""
    return files.read_log(path).records


@dataclass
class _Clock:
    """Training progress that a checkpoint must carry.

    ``plain_steps`` counts steps on which some layer that has curvature statistics had no
    usable inverse (the preconditioner passed its plain gradient through);
    ``numerical`` holds the preconditioner's :class:`natgrad.NumericalWarning` messages
    with their step; ``loads`` the machine's 1-minute load average at each evaluation.
    """

    step: int = 0
    time: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    log_sum: float = 0.0
    log_count: int = 0
    last_eval_step: int = -1
    log_lines: int = 0
    last_eval: dict[str, Any] | None = None
    plain_steps: int = 0
    plain_layers: list[str] = field(default_factory=list)
    numerical: list[dict[str, Any]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


class _RngState:
    """The global random-number state a run owns (torch CPU, the run's CUDA device,
    Python's ``random``): installed while the run trains and saved when it yields, so runs
    interleaved in one process draw exactly what they would draw one after another."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.save()

    def save(self) -> None:
        self.torch = torch.get_rng_state()
        self.python = random.getstate()
        self.cuda = (torch.cuda.get_rng_state(self.device)
                     if self.device.type == "cuda" else None)

    def install(self) -> None:
        torch.set_rng_state(self.torch)
        random.setstate(self.python)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _Run:
    """The state of one run in progress (model, optimizer, preconditioner, data generator,
    RNG state, clock and files): everything that makes it independent of other runs in
    the same process."""

    def __init__(self, cfg: RunConfig, data: ImageData, run_dir: Path,
                 workers: Workers) -> None:
        self.cfg, self.data, self.workers = cfg, data, workers
        self.folder = RunFolder(run_dir)
        if cfg.processes != workers.world_size:
            raise ValueError(f"the run is set up for {cfg.processes} processes but "
                             f"{workers.world_size} are running")
        check_batch(cfg.batch_size, workers.world_size)
        self.spec = resolve(cfg.spec)
        self.schedule = LRSchedule(**cfg.schedule)
        n = len(data.y_train)
        self.steps_per_epoch = n // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {cfg.batch_size} is larger than the training set ({n} images)"
            )
        self.total_steps = (
            max(1, math.ceil(cfg.epochs * self.steps_per_epoch)) if cfg.epochs else None
        )
        if self.schedule.needs_epochs() and self.total_steps is None:
            raise ValueError("a cosine learning-rate schedule needs --epochs")
        per = min(cfg.evals_per_epoch, self.steps_per_epoch)
        self.eval_positions = {round(j * self.steps_per_epoch / per) for j in range(1, per + 1)}
        self.device = workers.train_device(cfg.device)
        torch.manual_seed(cfg.seed)
        # `net` is the model itself (preconditioned, checkpointed, evaluated); `model` is
        # what training calls: `net`, or DDP around it on several processes.
        self.net = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size)
        self.net.to(self.device)
        self.model = workers.wrap(self.net)
        self.pre, self.opt = self.spec.build(self.net, cfg.hyperparameters, seed=cfg.seed,
                                             distributed=workers.preconditioner_sharing())
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.rng = _RngState(self.device)
        self.perm: torch.Tensor | None = None
        self.clock = _Clock()
        self.status = "running"
        self.say = lambda text: None

    # ------------------------------------------------------------------ files
    def write_meta(self, status: str, summary: dict[str, Any] | None = None) -> None:
        if not self.workers.is_main:
            return
        meta = {
            "config": self.cfg.as_dict(),
            "status": status,
            "method_config": (
                self.pre.config.as_dict() if self.pre is not None else None
            ),
            "parameters": count_parameters(self.net),
            "steps_per_epoch": self.steps_per_epoch,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "fallbacks": health.fallbacks(self.clock),
            "load_average": health.load_summary(self.clock.loads),
            "summary": summary or {},
        }
        self.folder.write_meta(meta)

    def log(self, record: dict[str, Any]) -> None:
        if self.workers.is_main:
            self.folder.append(record)
        self.clock.log_lines += 1

    # ------------------------------------------------------------------ steps
    def epoch(self) -> float:
        return self.clock.step / self.steps_per_epoch

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def budget_left(self) -> bool:
        if self.total_steps is not None and self.clock.step >= self.total_steps:
            return False
        return not (self.cfg.minutes is not None and self.clock.time >= self.cfg.minutes * 60)

    def done_fraction(self) -> float:
        """How much of the budget is spent, 0–1 (the larger of steps and clock)."""
        parts = []
        if self.total_steps is not None:
            parts.append(self.clock.step / self.total_steps)
        if self.cfg.minutes is not None:
            parts.append(self.clock.time / (60 * self.cfg.minutes))
        return min(1.0, max(parts)) if parts else 0.0

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns the batch loss. Timed."""
        start = time.perf_counter()
        spe, bs = self.steps_per_epoch, self.cfg.batch_size
        position = self.clock.step % spe
        if position == 0 or self.perm is None:
            self.perm = torch.randperm(len(self.data.y_train), generator=self.data_gen)
        # Every worker draws the whole global batch (same generator calls everywhere, so
        # order and augmentation are the one-process run's) and keeps its share.
        x, y = self.data.train_batch(self.perm[position * bs : (position + 1) * bs],
                                     self.data_gen)
        mine = self.workers.share(bs)
        x, y = x[mine].to(self.device, non_blocking=True), y[mine].to(self.device,
                                                                      non_blocking=True)
        factor = self.schedule.factor(self.clock.step, spe, self.total_steps)
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.pre is not None:
            self.pre.step()
        self.opt.step()
        value = loss.item()  # synchronises with an accelerator, so the clock is honest
        elapsed = time.perf_counter() - start
        # The global batch's loss, and rank 0's time, on every worker (one tiny all-reduce
        # off the clock): budgets, divergence and logs then agree everywhere.
        mine = torch.tensor([value, elapsed if self.workers.is_main else 0.0],
                            dtype=torch.float64)
        value, elapsed = self.workers.sum(mine).tolist()
        self.clock.time += elapsed
        self.clock.step += 1
        health.note_plain_gradient(self.pre, self.clock)
        return value / self.workers.world_size

    def eval_record(self, cache: dict | None = None) -> dict[str, Any]:
        """Evaluate, log and return the record. With ``cache``, a model whose weights were
        evaluated before on the same data (every method's step-0 model: same seed, same
        initialisation) reuses that result instead of a second pass over the test set."""
        key = (id(self.data), self.cfg.eval_batch_size, _weights_digest(self.net)) if (
            cache is not None) else None
        if key is not None and key in cache:
            test_loss, test_acc = cache[key]
        else:
            test_loss, test_acc = evaluate(self.net, self.data, self.cfg.eval_batch_size,
                                           self.device, self.workers)
            if key is not None:
                cache[key] = (test_loss, test_acc)
        c = self.clock
        train_loss = c.loss_sum / c.loss_count if c.loss_count else None
        c.loss_sum, c.loss_count, c.last_eval_step = 0.0, 0, c.step
        record = {
            "kind": "eval", "step": c.step, "epoch": round(self.epoch(), 6),
            "time": round(c.time, 6), "train_loss": train_loss,
            "test_loss": test_loss, "test_acc": test_acc, "lr": self.lr(),
        }
        self.log(record)
        c.last_eval = record
        load = health.load_average()
        if load is not None:
            c.loads.append(load)
        return record

    # ------------------------------------------------------------------ a stretch of training
    def advance(self, max_steps: int | None = None, on_step=None,
                stop_after_steps: int | None = None) -> bool:
        """Train up to ``max_steps`` steps (``None``: to the end of the budget) with this
        run's own RNG state installed; return whether the run has budget left.

        ``on_step(run)`` is called after every step (progress display);
        ``stop_after_steps`` raises ``KeyboardInterrupt`` there (tests).
        """
        if self.status != "running":
            return False
        self.rng.install()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                self._advance(max_steps, on_step, stop_after_steps)
        finally:
            self.rng.save()
            health.keep_warnings(caught, self.clock, self.say)
        return self.status == "running"

    def _advance(self, max_steps: int | None, on_step, stop_after_steps: int | None) -> None:
        cfg, c = self.cfg, self.clock
        taken = 0
        while (max_steps is None or taken < max_steps) and self.budget_left():
            loss = self.train_step()
            taken += 1
            if on_step is not None:
                on_step(self)
            if not math.isfinite(loss):
                self.status = "diverged"
                self.say(f"training loss became {loss} at step {c.step}; stopping this run")
                return
            c.loss_sum += loss
            c.loss_count += 1
            c.log_sum += loss
            c.log_count += 1
            if c.step % cfg.log_every == 0:
                self.log({"kind": "train", "step": c.step, "epoch": round(self.epoch(), 6),
                          "time": round(c.time, 6), "train_loss": c.log_sum / c.log_count,
                          "lr": self.lr()})
                c.log_sum, c.log_count = 0.0, 0
            position = c.step % self.steps_per_epoch or self.steps_per_epoch
            if position in self.eval_positions:
                r = self.eval_record()
                self.say(f"epoch {r['epoch']:.2f} step {r['step']} t={r['time']:.1f}s "
                         f"train loss {r['train_loss']:.4f} test loss {r['test_loss']:.4f} "
                         f"acc {100 * r['test_acc']:.2f}%")
            if position == self.steps_per_epoch:
                _save_checkpoint(self)
            if stop_after_steps is not None and c.step >= stop_after_steps:
                raise KeyboardInterrupt(f"stopped after {c.step} steps (stop_after_steps)")
        if not self.budget_left():
            self.status = "done"

    def finish(self) -> dict[str, Any]:
        """The final evaluation and ``meta.json``; return the summary."""
        c = self.clock
        status = "diverged" if self.status == "diverged" else "done"
        if status == "done" and (c.last_eval_step != c.step or c.last_eval is None):
            self.eval_record()
        last = c.last_eval
        summary = {
            "status": status,
            "steps": c.step,
            "epochs": self.epoch(),
            "train_time": c.time,
            "ms_per_iter": 1000 * c.time / max(1, c.step),
            "test_acc": last["test_acc"] if status == "done" else None,
            "test_loss": last["test_loss"] if status == "done" else None,
            "final_train_loss": last["train_loss"] if status == "done" else None,
        }
        self.write_meta(status, summary)
        self.status = status
        return summary


def _weights_digest(net: nn.Module) -> str:
    """A hash of the model's parameters and buffers (identical models, identical
    evaluations)."""
    h = hashlib.sha1()
    for name, tensor in net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _save_checkpoint(run: _Run) -> None:
    """Rank 0 writes the run's state at an epoch end (:class:`RunFolder`, atomically)."""
    if not run.workers.is_main:
        return
    state = {
        "version": CHECKPOINT_VERSION,
        "config": run.cfg.as_dict(),
        "model": run.net.state_dict(),
        "optimizer": run.opt.state_dict(),
        "preconditioner": run.pre.state_dict() if run.pre is not None else None,
        "data_generator": run.data_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "clock": asdict(run.clock),
    }
    run.folder.save_checkpoint(state)


def _load_checkpoint(run: _Run) -> None:
    """Rank 0 reads the checkpoint and every worker adopts it (one copy serves all:
    their states are identical), so the folder need only be on rank 0's machine."""
    state, problem = None, None
    if run.workers.is_main:
        path = run.folder.checkpoint_path
        try:
            state = run.folder.load_checkpoint()
        except ValueError as e:
            problem = e
        if problem is None and state.get("version") != CHECKPOINT_VERSION:
            problem = ValueError(f"{path}: unsupported checkpoint version "
                                 f"{state.get('version')!r}")
        elif problem is None and state["config"] != run.cfg.as_dict():
            problem = ConfigMismatch(f"{path} was written with other settings")
    state, problem = run.workers.from_main((None, problem) if problem else (state, None))
    if problem is not None:
        raise problem
    run.net.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    if run.pre is not None:
        run.pre.load_state_dict(state["preconditioner"])
    run.data_gen.set_state(state["data_generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    random.setstate(state["python_rng"])
    run.rng.save()
    known = {f.name for f in fields(_Clock)}
    run.clock = _Clock(**{k: v for k, v in state["clock"].items() if k in known})
    if run.workers.is_main:
        run.folder.keep_log_lines(run.clock.log_lines)


def _open_run(cfg: RunConfig, data: ImageData, run_dir: Path, *, resume: bool, quiet: bool,
              workers: Workers, start_evals: dict | None = None) -> _Run | dict[str, Any]:
    """The run ready to train (resumed from its checkpoint, or started with its step-0
    evaluation), or the summary of a run that is already finished (``resume``)."""
    from tqdm.auto import tqdm

    # Rank 0 looks at the folder and every worker follows its finding.
    finding: tuple[str, Any] = ("start", None)
    if workers.is_main:
        try:
            finding = RunFolder(run_dir).finding(cfg.as_dict(), resume)
        except ValueError as e:
            finding = ("error", str(e))
    kind, detail = workers.from_main(finding)
    if kind == "mismatch":
        raise ConfigMismatch(detail)
    if kind == "error":
        raise ValueError(detail)
    if kind == "finished":
        return detail
    run = _Run(cfg, data, run_dir, workers)
    label = f"{cfg.spec} seed {cfg.seed}"

    def say(text: str) -> None:
        if not quiet and workers.is_main:
            tqdm.write(f"[{label}] {text}", file=sys.stderr)

    run.say = say
    if kind == "resume":
        _load_checkpoint(run)
        say(f"resumed at epoch {run.epoch():.2f} (step {run.clock.step})")
    else:
        if workers.is_main:
            run.folder.start()
        run.eval_record(start_evals)
    run.write_meta("running")
    return run


class _Progress:
    """One tqdm bar on stderr for the runs training now: in steps when every run has an
    epoch budget only, else in percent of the budget (a ``--minutes`` budget is reached
    by the clock, so only the fraction of it has a total and an ETA)."""

    def __init__(self, runs: list[_Run], enabled: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        self.runs = runs
        self.by_steps = all(r.cfg.minutes is None for r in runs)
        total = (sum(r.total_steps for r in runs) if self.by_steps else 100.0 * len(runs))
        self.bar = tqdm(total=total, initial=self._done(), desc=desc,
                        unit="step" if self.by_steps else "%", file=sys.stderr,
                        disable=not enabled, leave=False, dynamic_ncols=True,
                        bar_format=None if self.by_steps else
                        "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")

    def _done(self) -> float:
        if self.by_steps:
            return sum(r.clock.step for r in self.runs)
        return sum(100.0 * r.done_fraction() for r in self.runs)

    def update(self, run: _Run) -> None:
        if self.bar.disable:
            return
        self.bar.update(self._done() - self.bar.n)
        last = run.clock.last_eval
        if last is not None and last["train_loss"] is not None:
            self.bar.set_postfix_str(f"{run.cfg.spec}: acc {100 * last['test_acc']:.2f}%",
                                     refresh=False)

    def close(self) -> None:
        self.bar.close()


def train_runs(
    cfgs: list[RunConfig],
    data: ImageData,
    run_dirs: list[str | os.PathLike],
    *,
    interleave: int | None = None,
    resume: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    stop_after_steps: int | None = None,
    workers: Workers | None = None,
) -> list[dict[str, Any]]:
    """Train several runs in this process; return their summaries (see :func:`train_run`).

    ``interleave=None`` trains them one after another. ``interleave=N`` opens them all and
    trains them round robin, ``N`` steps of one, then ``N`` of the next, so a change in the
    machine's speed (another job, thermal throttling) falls on every method alike instead
    of on whichever ran at that time. Each run keeps its own model, optimizer,
    preconditioner, data generator, RNG state and clock, so its numbers are those of the
    run alone; only the wall-clock order changes.
    """
    workers = workers or Workers.single()
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and workers.is_main
    # The runs of one seed start from the same weights: their step-0 evaluation is one.
    kw = {"resume": resume, "quiet": quiet, "workers": workers, "start_evals": {}}
    summaries: list[dict[str, Any] | None] = [None] * len(cfgs)
    if interleave is not None and interleave < 1:
        raise ValueError(f"interleave must be None or an integer >= 1, got {interleave}")
    if interleave is None or len(cfgs) == 1:
        for i, (cfg, folder) in enumerate(zip(cfgs, run_dirs)):
            run = _open_run(cfg, data, Path(folder), **kw)
            if isinstance(run, dict):
                summaries[i] = run
                continue
            bar = _Progress([run], progress, cfg.spec)
            try:
                run.advance(None, bar.update, stop_after_steps)
            finally:
                bar.close()
            summaries[i] = run.finish()
        return summaries
    opened = [_open_run(cfg, data, Path(folder), **kw) for cfg, folder in zip(cfgs, run_dirs)]
    runs = [r for r in opened if isinstance(r, _Run)]
    bar = _Progress(runs, progress, "interleaved") if runs else None
    try:
        active = list(runs)
        while active:
            active = [r for r in active if r.advance(interleave, bar.update, stop_after_steps)]
    finally:
        if bar is not None:
            bar.close()
    return [r if isinstance(r, dict) else r.finish() for r in opened]


def train_run(
    cfg: RunConfig,
    data: ImageData,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    stop_after_steps: int | None = None,
    workers: Workers | None = None,
) -> dict[str, Any]:
    """Train one run; return its summary (also saved in ``meta.json``).

    Args:
        resume: continue from ``checkpoint.pt`` if there is one (a finished run is not
            re-run); without it the folder is started afresh.
        progress: show a tqdm bar on stderr (``None``: only when stderr is a terminal).
        quiet: no per-evaluation lines on stderr.
        stop_after_steps: raise ``KeyboardInterrupt`` after this many steps (tests).
        workers: the processes training together (default: this one alone); every worker
            calls ``train_run`` with the same arguments and gets the same summary.

    Returns:
        ``{"status", "steps", "epochs", "train_time", "ms_per_iter", "test_acc",
        "test_loss", "final_train_loss"}``; ``status`` is ``"done"`` or ``"diverged"``
        (a non-finite training loss stops the run).

    Raises:
        ConfigMismatch: ``resume`` and the folder holds a run with other settings.
    """
    return train_runs([cfg], data, [run_dir], resume=resume, progress=progress, quiet=quiet,
                      stop_after_steps=stop_after_steps, workers=workers)[0]
