"""Starting a worker: rank and world size from the environment ``torchrun`` sets.

``torchrun --nproc-per-node N script.py`` (one machine) or
``torchrun --nnodes K --node-rank i --rdzv-endpoint HOST:PORT ...`` (several) starts the
workers with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
set; :func:`init_from_env` joins the process group from them (docs/distributed.md).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["WorldInfo", "init_from_env", "world_from_env"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class WorldInfo:
    """Where this worker stands.

    Attributes:
        rank: global rank in ``[0, world_size)``; rank 0 writes results.
        world_size: number of workers (1: not distributed).
        local_rank: rank on this machine (selects the GPU).
        device: the device this worker computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that prints, writes results and checkpoints."""
        return self.rank == 0


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``torchrun``'s variables; ``(0, 1, 0)`` when
    they are absent (a plain ``python`` run)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    values = []
    for key in _ENV:
        text = os.environ.get(key, "0")
        try:
            values.append(int(text))
        except ValueError:
            raise ValueError(
                f"environment variable {key} must be an integer, got {text!r}"
            ) from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> WorldInfo:
    """Join the default process group as ``torchrun`` describes (no-op for one process).

    Args:
        backend: ``"nccl"`` (GPUs) or ``"gloo"`` (CPU); default NCCL when CUDA is
            available, else gloo.
        timeout_s: how long a collective waits for a missing peer before failing with an
            error (instead of hanging), in seconds (> 0).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    rank, world, local = world_from_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return WorldInfo(rank, world, local, device)
