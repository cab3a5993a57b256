"""From what a user asks (:class:`PlanOptions`: the ``bench``/``tune`` options as typed
values, from the command line or a script) to a validated
:class:`~natgrad.experiments.bench.BenchPlan`: methods selected, hyperparameters layered
(defaults → preset → settings file → overrides), budget, schedule, targets; every run's
configuration and every method's optimizer and preconditioner built once, so a bad value
fails before anything is read, written or trained."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from . import methods as M
from .bench import DEFAULT_INTERLEAVE, DEFAULT_TARGETS, BenchPlan
from .presets import get_preset
from .schedule import LRSchedule, parse_schedule
from .train import MAX_SEED
from .tune import read_settings

__all__ = ["PlanOptions", "build_plan"]


@dataclass
class PlanOptions:
    """The options of ``natgrad bench``/``tune``, named as on the command line.

    ``methods``: specs (``None``: the preset's, or every method); ``lr``,
    ``weight_decay``, ``damping``: ``VALUE`` or ``SPEC=VALUE`` items; ``set``:
    ``[SPEC:]NAME=VALUE`` items; ``targets``: accuracies 0–1 (``None``: the dataset's);
    ``interleave``: steps per turn (``None``: the default, 0: one method after another).
    """

    dataset: str = "fashion-mnist"
    model: str = "cnn"
    data_dir: str | None = None
    augment: bool | None = None
    methods: list[str] | None = None
    preset: str | None = None
    settings: str | None = None
    lr: list[str] = field(default_factory=list)
    weight_decay: list[str] = field(default_factory=list)
    damping: list[str] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    epochs: float | None = None
    minutes: float | None = None
    batch_size: int | None = None
    lr_schedule: str | None = None
    seed: int = 0
    repeats: int = 1
    evals_per_epoch: int = 2
    log_every: int = 10
    threads: int | None = None
    device: str = "cpu"
    targets: list[float] | None = None
    interleave: int | None = None

    @classmethod
    def from_namespace(cls, args: Any, **parsed: Any) -> PlanOptions:
        """The fields of ``args`` (an ``argparse.Namespace``) this class has, with
        ``parsed`` values (already converted from text) winning."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **parsed})

    def check(self) -> None:
        """Ranges of the numeric options, named as on the command line.

        Raises:
            ValueError: the first option out of range.
        """
        for option, value in (("--epochs", self.epochs), ("--minutes", self.minutes)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{option} must be a number > 0, got {value:g}")
        for option, value in (("--batch-size", self.batch_size),
                              ("--evals-per-epoch", self.evals_per_epoch),
                              ("--log-every", self.log_every), ("--threads", self.threads),
                              ("--repeats", self.repeats)):
            if value is not None and value < 1:
                raise ValueError(f"{option} must be an integer >= 1, got {value}")
        if not 0 <= self.seed <= MAX_SEED - (self.repeats - 1):
            extra = (f" (with --repeats {self.repeats}: up to 2^63-{self.repeats})"
                     if self.repeats > 1 else "")
            raise ValueError(f"--seed must be an integer in 0 … 2^63-1{extra}, "
                             f"got {self.seed}")
        if self.interleave is not None and self.interleave < 0:
            raise ValueError(f"--interleave must be an integer >= 0 (0: one method after "
                             f"another), got {self.interleave}")
        if self.methods is not None and not [s for s in self.methods if s.strip()]:
            raise ValueError(f"--methods is empty ({','.join(self.methods)!r}); give "
                             "comma-separated specs, e.g. sgd,adam,kfac")


def _installed(spec: str) -> bool:
    try:
        M.resolve(spec)
    except ValueError:
        return False
    return True


def _hyperparameters(opts: PlanOptions, methods: list[M.MethodSpec], preset: Any
                     ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    preset_hp = (
        {m.name: preset.settings_for(m.name, m.method is not None) for m in methods}
        if preset else None
    )
    settings = None
    if opts.settings:
        settings = {M.resolve(k).name: v for k, v in read_settings(opts.settings).items()}
    overrides: dict = {}
    for option, key, values in (("--lr", "lr", opts.lr),
                                ("--weight-decay", "weight_decay", opts.weight_decay),
                                ("--damping", "damping", opts.damping),
                                ("--set", None, opts.set)):
        for target, hp in M.parse_overrides(option, key, values).items():
            overrides.setdefault(target, {}).update(hp)
    return M.merge_hyperparameters(methods, preset=preset_hp, settings=settings,
                                   overrides=overrides)


def build_plan(opts: PlanOptions, default_epochs: float) -> BenchPlan:
    """Resolve ``opts`` into a :class:`BenchPlan` and validate it
    (:meth:`BenchPlan.validate`); ``default_epochs`` is the budget when neither epochs
    nor minutes are given.

    Raises:
        ValueError: a bad option or hyperparameter, naming it (and the method).
    """
    opts.check()
    preset = get_preset(opts.preset) if opts.preset else None
    if opts.methods is not None:
        specs = [s for s in opts.methods if s.strip()]
    elif preset is not None:
        specs = [s for s in preset.methods if _installed(s)]
    else:
        specs = M.default_specs()
    methods, skipped = M.select(specs)
    notes = list(skipped)  # said once, with the other notes, when the bench starts
    if not methods:
        raise ValueError(f"no method left to run from --methods {','.join(specs)!r} "
                         f"({'; '.join(skipped)})")
    hyperparameters, hp_notes = _hyperparameters(opts, methods, preset)
    notes += hp_notes
    if opts.lr_schedule:
        schedule = parse_schedule(opts.lr_schedule)
    elif preset is not None:
        schedule = preset.schedule_for(opts.dataset)
    else:
        schedule = LRSchedule()
    epochs, minutes = opts.epochs, opts.minutes
    if epochs is None and minutes is None:
        epochs = default_epochs
    if schedule.needs_epochs() and epochs is None:
        raise ValueError(f"--lr-schedule {schedule} needs --epochs (it anneals to the end)")
    batch = opts.batch_size if opts.batch_size is not None else (
        preset.batch_size if preset else 128)
    interleave = DEFAULT_INTERLEAVE if opts.interleave is None else (opts.interleave or None)
    plan = BenchPlan(
        dataset=opts.dataset, model=opts.model, methods=methods,
        hyperparameters=hyperparameters, batch_size=batch, epochs=epochs, minutes=minutes,
        seeds=[opts.seed + i for i in range(opts.repeats)],
        targets=opts.targets or list(DEFAULT_TARGETS.get(opts.dataset, (0.9,))),
        schedule=schedule, evals_per_epoch=opts.evals_per_epoch, log_every=opts.log_every,
        augment=opts.augment, data_dir=opts.data_dir, device=opts.device,
        preset=opts.preset, notes=notes, interleave=interleave,
    )
    plan.validate()
    return plan
