"""The processes one training run uses: one (the default) or a ``torch.distributed`` group.

A run on ``W`` processes trains the same model as a run on one process with the same
global batch: every worker draws the whole global batch from the shared, seeded data
generator (so the data order and augmentation are the one-process ones) and keeps its
``1/W`` share of the rows; DDP averages the gradients, and the K-FAC-family
preconditioners get :class:`natgrad.distributed.DataParallel`, so their factors are the
global batch's (docs/distributed.md). Evaluation is split over the workers; rank 0 alone
prints, shows progress and writes files.

``W = 1`` is the same object with every collective a no-op, so the training loop has one
code path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from natgrad.distributed import DataParallel, WorldInfo, init_from_env, world_from_env

__all__ = ["LAUNCHED", "PEER_LOST", "Workers", "check_batch", "lost_peer", "run_local",
           "worker_argv"]

T = TypeVar("T")


@dataclass(frozen=True)
class Workers(WorldInfo):
    """This process's place among the run's workers: :class:`~natgrad.distributed.WorldInfo`
    (``rank``, ``world_size``, ``local_rank``, ``device``, ``is_main``) and

    Attributes:
        local_world_size: workers on this machine (divides the CPU cores between them).
    """

    local_world_size: int = 1

    @classmethod
    def single(cls) -> Workers:
        """This process alone."""
        return cls(0, 1, 0, torch.device("cpu"))

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = 600.0) -> Workers:
        """Join the group ``torchrun`` describes in the environment (``RANK``,
        ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); one process without them.

        The backend follows ``device``: NCCL for CUDA, gloo otherwise. Collectives fail
        with an error after ``timeout_s`` seconds instead of hanging on a lost worker.
        """
        if world_from_env()[1] == 1:
            return cls.single()
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        info = init_from_env(backend, timeout_s=timeout_s)
        local_world = _int_env("LOCAL_WORLD_SIZE", info.world_size)
        return cls(info.rank, info.world_size, info.local_rank, info.device, local_world)

    # ------------------------------------------------------------------ who does what
    def train_device(self, name: str) -> torch.device:
        """The device this worker trains on: ``"cuda"`` becomes ``cuda:LOCAL_RANK``."""
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def default_threads(self) -> int:
        """CPU threads per worker: the machine's cores shared by its workers."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)

    def share(self, n: int) -> slice:
        """This worker's rows of a global batch of ``n`` rows (contiguous, rank order)."""
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, n: int) -> range:
        """This worker's part of ``range(n)`` for evaluation (contiguous, nearly equal)."""
        bounds = [round(r * n / self.world_size) for r in range(self.world_size + 1)]
        return range(bounds[self.rank], bounds[self.rank + 1])

    # ------------------------------------------------------------------ training pieces
    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to call for training: ``DistributedDataParallel`` around ``module``
        (gradients averaged during ``backward``), or ``module`` itself for one worker."""
        if not self.distributed:
            return module
        device = next(module.parameters()).device
        return DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None
        )

    def preconditioner_sharing(self) -> DataParallel | None:
        """What K-FAC-family preconditioners get as ``distributed=``: a
        :class:`natgrad.distributed.DataParallel` (every worker keeps every inverse, so
        rank 0's checkpoint serves all) or ``None`` for one worker."""
        if not self.distributed:
            return None
        return DataParallel(share="inverse")

    # ------------------------------------------------------------------ collectives
    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over workers (a copy; ``values`` itself for one worker)."""
        if not self.distributed:
            return values
        total = values.to(self.device, copy=True)  # NCCL reduces device tensors only
        dist.all_reduce(total)
        return total.to(values.device)

    def from_main(self, obj: T) -> T:
        """Rank 0's ``obj`` on every worker (any picklable object)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every worker rank 0's buffers (batch-norm running statistics, which each
        worker updates from its own rows) before evaluating."""
        if not self.distributed:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def close(self, wait: bool = True) -> None:
        """Leave the process group: after a barrier (``wait``, the normal end: no worker
        leaves while others still need it), or at once (after an error, so that the other
        workers' next collective fails instead of waiting for this one)."""
        if self.distributed and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def check_batch(batch_size: int, processes: int) -> None:
    """The global batch must split into equal shares (DDP averages the workers' gradients
    with equal weights, which is the global mean only for equal shares)."""
    if batch_size % processes:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {processes} "
                         f"processes; use a multiple of {processes}")


#: Set in the environment of the workers :func:`run_local` starts (their launcher speaks
#: for them: one "interrupted" message, not one per worker).
LAUNCHED = "NATGRAD_LAUNCHED_LOCALLY"
#: Exit status of a launched worker whose collective failed because another worker is
#: gone: it exits quietly and the launcher names the worker that failed first.
PEER_LOST = 3


def lost_peer(err: BaseException) -> bool:
    """``err`` is a collective that failed because the other side went away."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer",
                                  "Broken pipe", "gloo", "NCCL"))


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (workers learn their number from the
    environment)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def run_local(nproc: int, argv: list[str], *, poll_s: float = 0.2) -> int:
    """Run ``python -m natgrad ARGV`` on ``nproc`` worker processes of this machine,
    joined over loopback (gloo, or NCCL for CUDA; the variables torchrun would set: ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
    and return the job's exit status.

    When a worker fails, the others are stopped at once and its status is returned (its
    own error message is on stderr). On Ctrl-C every worker gets the interrupt; they are
    waited for and ``KeyboardInterrupt`` is raised here.
    """
    port = _free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    jobs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **{LAUNCHED: "1"})
        env.setdefault("OMP_NUM_THREADS", threads)
        jobs.append(subprocess.Popen([sys.executable, "-m", "natgrad", *worker_argv(argv)],
                                     env=env))

    def stop(sig: int, wait_s: float) -> None:
        for job in jobs:
            if job.poll() is None:
                job.send_signal(sig)
        deadline = time.monotonic() + wait_s
        for job in jobs:
            try:
                job.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.kill()
                job.wait()

    try:
        waited = 0.0
        while True:
            codes = [job.poll() for job in jobs]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed and all(code == PEER_LOST for _, code in failed) and waited < 5.0:
                # Only workers that lost a peer so far: give the cause a moment to show.
                waited += poll_s
                time.sleep(poll_s)
                continue
            if failed:
                # The cause first: a worker killed by a signal, then any other failure.
                rank, code = min(failed, key=lambda f: (f[1] >= 0, f[1] == PEER_LOST))
                how = f"signal {-code}" if code < 0 else f"status {code}"
                print(f"natgrad: worker {rank} of {nproc} ended with {how}; stopping the others",
                      file=sys.stderr)
                stop(signal.SIGTERM, 10.0)
                return 128 - code if code < 0 else code  # the shell's convention for signals
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        # A terminal's Ctrl-C has reached every worker already; a signal to this process
        # alone is passed on after a grace period.
        deadline = time.monotonic() + 5.0
        while any(job.poll() is None for job in jobs) and time.monotonic() < deadline:
            time.sleep(poll_s)
        stop(signal.SIGINT, 30.0)
        raise


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _int_env(key: str, default: int) -> int:
    text = os.environ.get(key)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {key} must be an integer, got {text!r}") from None
