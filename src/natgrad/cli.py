"""The ``natgrad`` command: ``bench``, ``tune`` and ``report`` (see ``docs/bench.md``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


_EPILOG_HP = """\
hyperparameters: --lr/--weight-decay/--damping take VALUE (every method that has it) or
SPEC=VALUE items, comma-separated or repeated (e.g. --lr kfac=0.05,adam=1e-3); --set takes
[SPEC:]NAME=VALUE for any method field (e.g. --set kfac:T_inv=50 --set kl_clip=none).
Precedence: defaults < --preset < --settings < command line."""


def _add_common(p: argparse.ArgumentParser, *, default_epochs: float) -> None:
    from natgrad.experiments.data import DATASETS
    from natgrad.experiments.models import MODELS
    from natgrad.experiments.presets import PRESETS

    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="dataset (default: fashion-mnist, or the preset's)")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the dataset files (CIFAR/SVHN default: ./data; "
                   "Fashion-MNIST falls back to /usr/share/datasets/fashion-mnist)")
    g.add_argument("--model", default=None, choices=list(MODELS),
                   help="model (default: cnn, or the preset's)")
    g.add_argument("--no-augment", action="store_true",
                   help="switch off the dataset's training augmentation")
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=None,
                   help="comma-separated specs, e.g. sgd,adam,kfac,ekfac+adam,soap (default: "
                   "sgd, adam, every registered method, and soap/shampoo if heavyball is "
                   "installed)")
    g.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="a paper's settings, named after its method (batch size, schedule, "
                   "T_cov/T_inv, damping, lr; methods compared when --methods is not given)")
    g.add_argument("--lr", action="append", default=[], metavar="[SPEC=]VALUE",
                   help="learning rate(s)")
    g.add_argument("--weight-decay", action="append", default=[], metavar="[SPEC=]VALUE",
                   help="weight decay(s) (default 0)")
    g.add_argument("--damping", action="append", default=[], metavar="[SPEC=]VALUE",
                   help="damping λ of K-FAC-family methods")
    g.add_argument("--set", action="append", default=[], metavar="[SPEC:]NAME=VALUE",
                   help="any method hyperparameter (config field or peer keyword)")
    g = p.add_argument_group("budget and schedule")
    g.add_argument("--epochs", type=float, default=None,
                   help=f"epochs per run (fractions allowed; default {default_epochs:g}, or "
                   "the preset's paper budget for bench, unless --minutes is given)")
    g.add_argument("--minutes", type=float, default=None,
                   help="training-clock minutes per run (with --epochs: whichever ends first)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="batch size (default 128, or the preset's)")
    g.add_argument("--lr-schedule", default=None, metavar="SCHEDULE",
                   help="constant | step:every=EPOCHS,gamma=0.1 | step:every_steps=N | "
                   "cosine[:warmup=EPOCHS] (default: constant, or the preset's)")
    g.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    g.add_argument("--evals-per-epoch", type=int, default=2,
                   help="test evaluations per epoch (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=10,
                   help="steps between training-loss log records (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--device", default="cpu",
                   help="torch device to train on, e.g. cuda (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--resume", action="store_true",
                   help="continue interrupted runs in --out from their last epoch checkpoint "
                   "(finished runs are kept)")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="tqdm progress bars on stderr (auto: when stderr is a terminal)")
    g.add_argument("--quiet", action="store_true", help="no per-evaluation lines on stderr")
    g.add_argument("--fresh", action="store_true",
                   help="--out holds another experiment: remove its runs, table and plots "
                   "and start this one (without it such a folder is refused)")
    g.add_argument("--dry-run", action="store_true",
                   help="resolve the plan and build every method's configuration, "
                   "optimizer and preconditioner (no data, nothing written); print the plan "
                   "and exit")


def build_parser() -> argparse.ArgumentParser:
    from natgrad.experiments.bench import DEFAULT_INTERLEAVE

    parser = argparse.ArgumentParser(
        prog="natgrad",
        description="Benchmark Kronecker-factored natural-gradient methods against "
        "SGD-momentum and Adam on real data (docs/bench.md).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = sub.add_parser(
        "bench", help="train one model with every method; write table, plots and logs",
        description="Train one model on one dataset with a list of methods (same seed, data "
        "order and budget), then write results.md/.csv, plots/*.png and per-run JSON-lines "
        "logs into --out.", epilog=_EPILOG_HP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(bench, default_epochs=3)
    bench.add_argument("--targets", default=None, metavar="ACC[,ACC...]",
                       help="test-accuracy thresholds, in %% or 0–1 (default per dataset; "
                       "fashion-mnist: 88,90)")
    bench.add_argument("--repeats", type=int, default=1,
                       help="seeds seed..seed+N-1 per method; table shows mean ± std")
    bench.add_argument("--settings", default=None, metavar="JSON",
                       help="best settings written by `natgrad tune`")
    bench.add_argument("--out", default="results", help="results folder (default: %(default)s)")
    bench.add_argument("--interleave", type=int, default=None, metavar="N",
                       help="the methods take turns in this process, N steps each, so the "
                       "machine's drift falls on all alike (default: "
                       f"{DEFAULT_INTERLEAVE}); 0 = one method after another (needs the "
                       "memory of one run at a time)")
    bench.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train each run data-parallel on N local processes (gloo, or "
                       "NCCL with --device cuda; --batch-size is the global batch). For "
                       "several machines run "
                       "`torchrun ... -m natgrad bench ...` on each (docs/distributed.md)")

    tune = sub.add_parser(
        "tune", help="grid-search lr × damping × weight decay; write best settings JSON",
        description="The papers' grid search: every (lr, damping, weight decay) point trains "
        "for a few epochs; the best point per method by training loss is written to a JSON "
        "that `natgrad bench --settings` reads.", epilog=_EPILOG_HP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(tune, default_epochs=2)
    tune.add_argument("--lrs", default=None, metavar="LR[,LR...]",
                      help="learning rates (default: each method's default × 1/3, 1, 3; or "
                      "the preset's grid)")
    tune.add_argument("--dampings", default=None, metavar="D[,D...]",
                      help="dampings for K-FAC-family methods (default: 0.03,0.003,0.001)")
    tune.add_argument("--weight-decays", default=None, metavar="WD[,WD...]",
                      help="weight decays (default: 0,5e-4)")
    tune.add_argument("--out", default="tune", help="folder for the tuning runs "
                      "(default: %(default)s)")
    tune.add_argument("--settings-out", default=None, metavar="JSON",
                      help="where to write the best settings (default: OUT/settings.json)")

    report = sub.add_parser(
        "report", help="rebuild table and plots from a results folder",
        description="Rebuild results.md, results.csv and plots/ from the logs saved in DIR "
        "by `natgrad bench`.",
    )
    report.add_argument("dir", metavar="DIR", help="results folder written by `natgrad bench`")
    report.add_argument("--targets", default=None, metavar="ACC[,ACC...]",
                        help="accuracy thresholds, in %% or 0–1 (default: the bench's)")
    return parser


def _floats(option: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} expects comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values


def _targets(text: str | None) -> list[float] | None:
    values = _floats("--targets", text)
    if values is None:
        return None
    out = [v / 100 if v > 1 else v for v in values]
    bad = [v for v in out if not 0 < v <= 1]
    if bad:
        raise ValueError(f"--targets must be accuracies in (0, 100]%, got {text!r}")
    return out


def _plan(args: argparse.Namespace, default_epochs: float, preset_budget: bool = True):
    """The validated :class:`~natgrad.experiments.bench.BenchPlan` of the command line
    (:func:`~natgrad.experiments.plan.build_plan` on its typed options); a preset supplies
    the defaults of --dataset, --model and (with ``preset_budget``) --epochs."""
    from natgrad.experiments.plan import PlanOptions, build_plan

    methods = None if args.methods is None else args.methods.split(",")
    options = PlanOptions.from_namespace(
        args, methods=methods, targets=_targets(getattr(args, "targets", None)),
        augment=False if args.no_augment else None)
    return build_plan(options, default_epochs, preset_budget=preset_budget)


def _progress(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.progress]


def _print_plan(plan, extra: str = "") -> None:
    import json

    from natgrad.experiments.presets import get_preset

    shown = {k: v for k, v in plan.as_dict().items() if k != "machine"}
    shown["hyperparameters"] = {m.name: m.resolved(plan.hyperparameters[m.name])
                                for m in plan.methods}
    if plan.preset:
        shown["paper"] = get_preset(plan.preset).describe()
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    if extra:
        print(extra)


def _cmd_bench(args: argparse.Namespace) -> int:
    from natgrad.distributed import world_from_env
    from natgrad.experiments.bench import run_bench
    from natgrad.experiments.files import check_output_folder
    from natgrad.experiments.workers import Workers

    if args.nproc < 1:
        raise ValueError(f"--nproc must be an integer >= 1, got {args.nproc}")
    world = world_from_env()[1]
    if world == 1 and args.nproc > 1:
        return _launch_bench(args)
    if world > 1 and args.nproc not in (1, world):
        raise ValueError(f"--nproc {args.nproc} disagrees with torchrun's WORLD_SIZE={world}; "
                         "give one or the other")
    plan = _plan(args, default_epochs=3)
    plan.processes = world
    if args.dry_run:
        _print_plan(plan)
        return 0
    check_output_folder(args.out)
    workers = Workers.from_env(args.device)
    try:
        if workers.distributed and not args.threads:
            import torch

            torch.set_num_threads(workers.default_threads())
        text = run_bench(plan, args.out, resume=args.resume, fresh=args.fresh,
                         progress=_progress(args), quiet=args.quiet, workers=workers)
    except BaseException:
        workers.close(wait=False)
        raise
    workers.close()
    if text is not None:
        print(text)
        out = Path(args.out)
        print(f"table: {out / 'results.md'}, {out / 'results.csv'}; plots: {out / 'plots'}; "
              f"logs: {out / 'runs'}/<method>/seed<k>/log.jsonl")
    return 0


def _launch_bench(args: argparse.Namespace) -> int:
    """``natgrad bench --nproc N``: check the plan here, then run the same command on N
    local worker processes (:func:`~natgrad.experiments.workers.run_local`) and return
    the job's exit status."""
    from natgrad.experiments.data import load
    from natgrad.experiments.files import check_output_folder
    from natgrad.experiments.workers import check_batch, run_local

    plan = _plan(args, default_epochs=3)
    plan.processes = args.nproc
    check_batch(plan.batch_size, args.nproc)
    if args.dry_run:
        _print_plan(plan)
        return 0
    check_output_folder(args.out)
    load(plan.dataset, plan.data_dir, plan.augment)  # a missing dataset fails here, once
    return run_local(args.nproc, args.argv)


def _cmd_tune(args: argparse.Namespace) -> int:
    from natgrad.experiments.files import check_output_folder
    from natgrad.experiments.presets import get_preset
    from natgrad.experiments.tune import build_grids, check_settings_out, run_tune

    plan = _plan(args, default_epochs=2, preset_budget=False)
    plan.evals_per_epoch = 1
    grids = build_grids(plan, get_preset(args.preset).grid if args.preset else {},
                        lrs=_floats("--lrs", args.lrs),
                        dampings=_floats("--dampings", args.dampings),
                        weight_decays=_floats("--weight-decays", args.weight_decays))
    settings_out = args.settings_out or str(Path(args.out) / "settings.json")
    check_settings_out(settings_out)
    if args.dry_run:
        _print_plan(plan, f"grid points: { {k: len(v) for k, v in grids.items()} }")
        return 0
    check_output_folder(args.out)
    settings = run_tune(plan, grids, args.out, settings_out, resume=args.resume,
                        fresh=args.fresh, progress=_progress(args), quiet=args.quiet)
    print("| method | best settings | training loss |")
    print("|---|---|---|")
    for spec in settings.get("unconverged", []):
        print(f"| {spec} | none: no point converged | — |")
    for r in settings["results"]:
        if r["hyperparameters"] == settings["settings"].get(r["spec"]):
            hp = ", ".join(f"{k}={v:g}" for k, v in r["hyperparameters"].items()
                           if k in ("lr", "damping", "weight_decay"))
            loss = "diverged" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
            print(f"| {r['spec']} | {hp} | {loss} |")
    print(f"settings: {settings_out} (use with `natgrad bench --settings {settings_out}`)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from natgrad.experiments.bench import write_report

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"DIR {args.dir} is not a folder")
    print(write_report(args.dir, _targets(args.targets)))
    print(f"rebuilt {Path(args.dir) / 'results.md'}, results.csv and plots/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``natgrad`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": _cmd_bench, "tune": _cmd_tune, "report": _cmd_report}
    from natgrad.experiments.files import FolderBusy

    if (getattr(args, "threads", None) or 0) >= 1:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        from natgrad.experiments.workers import LAUNCHED

        if LAUNCHED not in os.environ and os.environ.get("RANK", "0") == "0":
            print("\nnatgrad: interrupted; run the same command with --resume to continue from "
                  "the last epoch checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `natgrad ... | head`: stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, OSError, FolderBusy) as e:  # DatasetMissing: a FileNotFoundError
        print(f"natgrad {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from natgrad.experiments.workers import LAUNCHED, PEER_LOST, lost_peer

        if LAUNCHED in os.environ and lost_peer(e):
            # Another worker of `--nproc` died; the launcher says which, in one line.
            return PEER_LOST
        raise


if __name__ == "__main__":
    sys.exit(main())
