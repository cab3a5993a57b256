"""Data-parallel K-FAC: bytes per step and step time at 1 and 2 gloo workers (issue 6).

ResNet-20 (``natgrad.experiments.models.resnet(20)``) on CIFAR-shaped random input
(32×32×3, ``--batch`` = 128 rows per worker, float32), DDP over gloo on this machine's
loopback, ``natgrad.distributed.DataParallel(share="inverse")``. It prints:

* **bytes per factor update**, K-FAC (all-reduce of ``A``, ``G``: ``Σ_l d_in'² + d_out²``
  numbers) vs SKFAC-RS (all-gather of the rows ``Y_A``, ``Y_G``: ``M_w·Σ_l (d_in' + d_out)``
  numbers per worker) — analytic from the layer shapes, and measured (the payload bytes
  natgrad's collectives were called with, :attr:`Collective.sent`); also the inverse
  broadcast per refresh, ``Δ`` per step for ``share="gradient"``, and DDP's gradient
  all-reduce for scale;
* **step time** at 1 and 2 processes, split into forward+backward (DDP all-reduce
  included), the preconditioner's step on plain / factor-update / refresh steps, and
  amortized over K-FAC's schedule (``T_cov = 10``, ``T_inv = 100``) and SKFAC's (20, 200);
  ratios 2-process / 1-process (weak scaling: the same rows per worker, so 1.0 is ideal).

Each worker uses one thread. Timings on a shared machine are noisy; the ratios come from
one run. Usage: ``python benchmarks/distributed_comm.py [--batch 128] [--steps 9] [--json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.distributed import DataParallel
from natgrad.experiments.models import resnet
from natgrad.step import Step

METHODS = ("kfac", "skfac")
FOLD = Step.fold
#: Paper schedules used for the amortized step time (T_cov, T_inv).
PAPER_SCHEDULE = {"kfac": (10, 100), "skfac": (20, 200)}
#: The measured run's schedule: step 0 warms up; then full (update + refresh) steps at
#: 4, 8, ..., update-only steps at 2, 6, ..., and plain steps in between.
RUN_SCHEDULE = {"T_cov": 2, "T_inv": 4}
FLOAT_BYTES = 4


def layer_shapes() -> list[tuple[int, int]]:
    pre = natgrad.KFAC(resnet(20))
    return [layer.handler.shape(layer.module) for layer in pre.layers.values()]


def analytic_bytes(batch: int, world: int) -> dict[str, float]:
    """Payload bytes per worker, float32, from the layer shapes alone."""
    shapes = layer_shapes()
    params = sum(p.numel() for p in resnet(20).parameters())
    return {
        "kfac_factor_allreduce_per_update": FLOAT_BYTES * sum(i * i + o * o for o, i in shapes),
        "skfac_rows_allgather_per_update_sent": FLOAT_BYTES * batch * sum(i + o for o, i in shapes),
        "skfac_rows_allgather_per_update_received": FLOAT_BYTES
        * batch
        * world
        * sum(i + o for o, i in shapes),
        "kfac_inverse_broadcast_per_refresh": FLOAT_BYTES * sum(i * i + o * o for o, i in shapes),
        "gradient_share_per_step": FLOAT_BYTES * sum(i * o for o, i in shapes),
        "ddp_gradient_allreduce_per_step": FLOAT_BYTES * params,
    }


def kind_of(step: int) -> str:
    if step % RUN_SCHEDULE["T_inv"] == 0:
        return "refresh"
    return "update" if step % RUN_SCHEDULE["T_cov"] == 0 else "plain"


def worker(rank: int, world: int, port: int, batch: int, steps: int, outdir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )
    else:  # a group of one, so that the same code path (and its collectives) runs
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=300),
        )
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    out = {}
    for method in ("sgd", *METHODS):
        torch.manual_seed(0)
        net = resnet(20)
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        pre = None
        if method != "sgd":
            pre = natgrad.METHODS[method](net, opt, distributed=DataParallel(), **RUN_SCHEDULE)
        phases = {"rows": 0.0, "factors": 0.0, "refresh": 0.0}
        if pre is not None:  # time the scheduled phases themselves (compute + collectives)
            pre._capture.pop = timed(pre._capture.pop, phases, "rows")
            Step.fold = timed(FOLD, phases, "factors")  # natgrad/step.py's phases
            pre._sharing.refresh = timed(pre._sharing.refresh, phases, "refresh")
        records = []
        for step in range(steps):
            phases.update(rows=0.0, factors=0.0, refresh=0.0)
            sent_before = dict(pre.distributed.comm.sent) if pre else {}
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            t1 = time.perf_counter()
            if pre is not None:
                pre.step()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            sent = (
                {k: v - sent_before.get(k, 0) for k, v in pre.distributed.comm.sent.items()}
                if pre
                else {}
            )
            records.append(
                {
                    "kind": kind_of(step),
                    **phases,
                    "fwd_bwd": t1 - t0,
                    "pre": t2 - t1,
                    "opt": t3 - t2,
                    "sent": sent,
                }
            )
        out[method] = records[1:]  # step 0 warms up
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def timed(fn, phases: dict, phase: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[phase] += time.perf_counter() - start

    return wrapper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, batch: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(worker, args=(world, free_port(), batch, steps, outdir), nprocs=world)
        ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
    return ranks[0]  # rank 0's view; all ranks run in lockstep


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarise(records: dict) -> dict:
    out = {}
    for method, steps in records.items():
        row = {
            "fwd_bwd_s": mean(r["fwd_bwd"] for r in steps),
            "opt_s": mean(r["opt"] for r in steps),
        }
        if method != "sgd":
            for kind in ("plain", "update", "refresh"):
                ks = [r for r in steps if r["kind"] == kind]
                row[f"pre_{kind}_s"] = mean(r["pre"] for r in ks)
                for coll in ("all_reduce", "broadcast", "all_gather"):
                    row[f"{coll}_bytes_{kind}"] = mean(r["sent"].get(coll, 0) for r in ks)
            updates = [r for r in steps if r["kind"] != "plain"]
            refreshes = [r for r in steps if r["kind"] == "refresh"]
            # a factor update = forming the rows (capture) + the factors and their exchange
            row["factor_update_s"] = mean(r["rows"] + r["factors"] for r in updates)
            row["refresh_s"] = mean(r["refresh"] for r in refreshes)
            row["apply_s"] = mean(r["pre"] - r["rows"] - r["factors"] - r["refresh"] for r in steps)
            t_cov, t_inv = PAPER_SCHEDULE[method]
            pre_amortized = (
                row["apply_s"] + row["factor_update_s"] / t_cov + row["refresh_s"] / t_inv
            )
            row["step_amortized_s"] = row["fwd_bwd_s"] + row["opt_s"] + pre_amortized
        else:
            row["step_amortized_s"] = row["fwd_bwd_s"] + row["opt_s"]
        out[method] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="rows per worker (default 128)")
    parser.add_argument(
        "--steps",
        type=int,
        default=9,
        help="steps per method, the first a warm-up (default 9: two refresh, "
        "two update and four plain steps measured)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 5:
        parser.error(f"need --batch >= 1 and --steps >= 5, got {args.batch}, {args.steps}")

    result = {
        "model": "resnet20",
        "input": [3, 32, 32],
        "batch_per_worker": args.batch,
        "dtype": "float32",
        "backend": "gloo",
        "threads_per_worker": 1,
        "analytic": {w: analytic_bytes(args.batch, w) for w in (1, 2)},
        "measured": {},
    }
    for world in (1, 2):
        result["measured"][world] = summarise(run(world, args.batch, args.steps))
    one, two = result["measured"][1], result["measured"][2]
    result["ratios"] = {
        "step_time_2proc_over_1proc": {
            m: two[m]["step_amortized_s"] / one[m]["step_amortized_s"] for m in one
        },
        "skfac_over_kfac_bytes_per_factor_update_analytic": result["analytic"][2][
            "skfac_rows_allgather_per_update_sent"
        ]
        / result["analytic"][2]["kfac_factor_allreduce_per_update"],
        "skfac_over_kfac_bytes_per_factor_update_measured": two["skfac"]["all_gather_bytes_update"]
        / two["kfac"]["all_reduce_bytes_update"],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    a2 = result["analytic"][2]
    print(f"ResNet-20, 32×32×3, batch {args.batch}/worker, float32, gloo, 1 thread/worker")
    print("\nbytes per worker (analytic from shapes | measured payload at 2 workers)")
    print(
        f"  K-FAC factor all-reduce / update   {a2['kfac_factor_allreduce_per_update']:>12,}"
        f" | {two['kfac']['all_reduce_bytes_update']:>12,.0f}"
    )
    print(
        f"  SKFAC row all-gather / update      {a2['skfac_rows_allgather_per_update_sent']:>12,}"
        f" sent, {a2['skfac_rows_allgather_per_update_received']:,} received"
        f" | {two['skfac']['all_gather_bytes_update']:>12,.0f} sent"
    )
    print(
        f"  K-FAC inverse broadcast / refresh  {a2['kfac_inverse_broadcast_per_refresh']:>12,}"
        f" | {two['kfac']['broadcast_bytes_refresh']:>12,.0f}"
    )
    print(f"  Δ broadcast / step (share=gradient){a2['gradient_share_per_step']:>12,}")
    print(f"  DDP gradient all-reduce / step     {a2['ddp_gradient_allreduce_per_step']:>12,}")
    print(
        "\nseconds (fwd+bwd incl. DDP per step | preconditioner: apply per step, factor update,"
        " refresh | step amortized over the paper schedule)"
    )
    for world in (1, 2):
        for method, row in result["measured"][world].items():
            pre = (
                " ".join(f"{row[k]:.3f}" for k in ("apply_s", "factor_update_s", "refresh_s"))
                if method != "sgd"
                else "-"
            )
            print(
                f"  {world} proc {method:6s} {row['fwd_bwd_s']:.3f} | {pre:>19s} |"
                f" {row['step_amortized_s']:.3f}"
            )
    print("\nratios measured in this run")
    for method, r in result["ratios"]["step_time_2proc_over_1proc"].items():
        print(f"  step time 2 proc / 1 proc, {method:6s} {r:.2f}  (1.0 = perfect weak scaling)")
    print(
        f"  SKFAC / K-FAC bytes per factor update: analytic "
        f"{result['ratios']['skfac_over_kfac_bytes_per_factor_update_analytic']:.3f}, measured "
        f"{result['ratios']['skfac_over_kfac_bytes_per_factor_update_measured']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
