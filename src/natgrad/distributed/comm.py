"""The collectives natgrad's data-parallel training uses, on one ``torch.distributed`` group.

Three kinds of traffic (docs/distributed.md):

* **averages** of curvature statistics at factor updates (all-reduce of
  ``Σ_w M_w·X_w`` and ``Σ_w M_w``, so workers with different batch sizes ``M_w`` still
  give the global batch's mean);
* **broadcasts** from the worker that owns a layer: its inverse state after a refresh,
  or (when only owners keep inverses) its preconditioned gradient every step;
* **row gathers** for estimates made of per-sample rows (SKFAC's ``Y``): the global
  batch's rows are the workers' rows stacked in rank order.

Every worker must reach every collective, in the same order, or the job waits until the
group's timeout. Work that can fail on one worker only (non-finite statistics) is
therefore run through :meth:`Collective.agree`: the outcome is shared first, and every
worker then takes the same branch. A failure that the library cannot recover from is
reported to the peers too, which then raise :class:`PeerFailed` rather than wait.

:attr:`Collective.sent` counts the payload bytes each collective was called with, per
kind, on this worker (the benchmark's "measured" bytes).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import NonFiniteStatistics
from ..state import Stateful

__all__ = ["Collective", "DistributedError", "PeerFailed", "Value"]

#: A state value that can travel: a tensor, a number, a flag, or ``None``.
Value = Tensor | float | int | bool | None

# Outcome codes shared by :meth:`Collective.agree` (all-reduced with MAX, so the worst wins).
_OK, _NON_FINITE, _FATAL = 0, 1, 2


class DistributedError(RuntimeError):
    """A collective failed: a peer stopped, or did not answer within the group's timeout."""


class PeerFailed(DistributedError):
    """Another worker raised an error; this worker stops instead of waiting for it."""


class Collective:
    """natgrad's collectives on one process group.

    Args:
        group: the process group (``None``: the default group, which must be initialised,
            e.g. by :func:`natgrad.distributed.init_from_env` or ``torchrun`` +
            ``dist.init_process_group``).
        device: where the communication buffers live: the CPU for gloo, this worker's
            GPU for NCCL (default: chosen from the group's backend).
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, device: torch.device | None = None
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised: call natgrad.distributed.init_from_env() "
                "(under torchrun) or torch.distributed.init_process_group(...) first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = (
                torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            )
        self.device = device
        #: Payload bytes passed to each kind of collective by this worker.
        self.sent: Counter[str] = Counter()

    # ------------------------------------------------------------------ plumbing
    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _call(self, kind: str, fn: Callable[..., Any], *args: Any, nbytes: int = 0, **kw: Any):
        self.sent[kind] += nbytes
        try:
            return fn(*args, group=self.group, **kw)
        except (RuntimeError, ValueError) as err:  # gloo/NCCL report a lost peer or timeout so
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {kind} failed — a peer worker stopped or "
                f"did not answer within the process group's timeout ({err})"
            ) from err

    # ------------------------------------------------------------------ agreement
    def agree(self, target: Stateful | None, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` here, then make every worker take the same branch.

        If ``fn`` raised :class:`~natgrad.curvature.NonFiniteStatistics` on *any* worker,
        ``target`` (whose state ``fn`` may have changed) is restored from a snapshot on
        every worker and ``NonFiniteStatistics`` is raised everywhere (the preconditioner
        then warns and keeps the previous estimate). If ``fn`` raised anything else, that
        worker re-raises it and the others raise :class:`PeerFailed`. Otherwise returns
        ``fn``'s result.
        """
        before = target.state_dict() if target is not None else None
        result, code, error = None, _OK, None
        try:
            result = fn(*args)
        except NonFiniteStatistics as err:
            code, error = _NON_FINITE, err
        except Exception as err:  # noqa: BLE001 - reported to the peers, then re-raised
            code, error = _FATAL, err
        flag = torch.tensor([code], dtype=torch.int32, device=self.device)
        self._call("all_reduce", dist.all_reduce, flag, op=dist.ReduceOp.MAX, nbytes=4)
        worst = int(flag.item())
        if code == _FATAL:
            raise error
        if worst == _FATAL:
            raise PeerFailed(
                f"rank {self.rank}/{self.world_size}: another worker raised an error; see its "
                "traceback (this worker stops rather than wait for it)"
            )
        if worst == _NON_FINITE:
            if target is not None and code == _OK:
                target.load_state_dict(before)
            if error is not None:
                raise error
            raise NonFiniteStatistics("batch statistics of another worker contain NaN or Inf")
        return result

    # ------------------------------------------------------------------ averages
    def weighted_mean(self, values: Sequence[Value], weight: float) -> list[Value]:
        """``Σ_w weight_w · x_w / Σ_w weight_w`` of each value, over workers.

        Floating tensors and Python floats are averaged; anything else (flags, integers,
        ``None``) is returned as it is (it must already agree across workers). One
        all-reduce per floating dtype.
        """
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        groups: dict[torch.dtype, list[int]] = {}
        for i, v in enumerate(values):
            dtype = _float_dtype(v)
            if dtype is not None:
                groups.setdefault(dtype, []).append(i)
        out = list(values)
        for dtype, idx in groups.items():
            parts = [
                torch.as_tensor(values[i], dtype=dtype, device=self.device).reshape(-1) for i in idx
            ]
            flat = torch.cat([*parts, torch.ones(1, dtype=dtype, device=self.device)]).mul_(weight)
            self._call(
                "all_reduce", dist.all_reduce, flat, nbytes=flat.numel() * flat.element_size()
            )
            total = flat[-1]
            offset = 0
            for i, part in zip(idx, parts):
                mean = flat[offset : offset + part.numel()] / total
                offset += part.numel()
                v = values[i]
                out[i] = (
                    mean.reshape(v.shape).to(v.device)
                    if isinstance(v, Tensor)
                    else float(mean.item())
                )
        return out

    def weighted_mean_(self, target: object, keys: Sequence[str], weight: float) -> None:
        """:meth:`weighted_mean` of the attributes ``keys`` of ``target``, written back."""
        means = self.weighted_mean([getattr(target, k) for k in keys], weight)
        for key, value in zip(keys, means):
            setattr(target, key, value)

    # ------------------------------------------------------------------ broadcasts
    def broadcast_tensors(self, tensors: Sequence[Tensor], src: int) -> list[Tensor]:
        """The ``src`` worker's ``tensors``; every worker passes tensors of the same shapes
        and dtypes (their values are ignored except on ``src``). One broadcast per dtype."""
        out = list(tensors)
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(t.dtype, []).append(i)
        for idx in groups.values():
            flat = torch.cat([tensors[i].reshape(-1).to(self.device) for i in idx])
            self._call(
                "broadcast",
                dist.broadcast,
                flat,
                self._global(src),
                nbytes=flat.numel() * flat.element_size(),
            )
            offset = 0
            for i in idx:
                t = tensors[i]
                out[i] = flat[offset : offset + t.numel()].reshape(t.shape).to(t.device)
                offset += t.numel()
        return out

    def broadcast_values(
        self, values: Mapping[str, Mapping[str, Value]] | None, src: int
    ) -> dict[str, dict[str, Value]]:
        """The ``src`` worker's ``{owner key: {state key: value}}``; other workers pass ``None``
        (they need not know the shapes: a small description travels first)."""
        if (self.rank == src) != (values is not None):
            raise ValueError(
                f"broadcast_values: only the source rank {src} passes values (rank {self.rank} "
                f"passed {'values' if values is not None else 'None'})"
            )
        shapes: list[Any] = [None]
        tensors: list[Tensor] = []
        if values is not None:
            shapes[0] = {}
            for owner, state in values.items():
                desc = {}
                for key, v in state.items():
                    if isinstance(v, Tensor):
                        desc[key] = ("tensor", tuple(v.shape), v.dtype)
                        tensors.append(v)
                    else:
                        desc[key] = ("value", v)
                shapes[0][owner] = desc
        self._call(
            "broadcast", dist.broadcast_object_list, shapes, self._global(src), device=self.device
        )
        if values is None:
            tensors = [
                torch.empty(d[1], dtype=d[2], device=self.device)
                for desc in shapes[0].values()
                for d in desc.values()
                if d[0] == "tensor"
            ]
        received = iter(self.broadcast_tensors(tensors, src))
        return {
            owner: {key: next(received) if d[0] == "tensor" else d[1] for key, d in desc.items()}
            for owner, desc in shapes[0].items()
        }

    # ------------------------------------------------------------------ gathers
    def batch_sizes(self, size: int) -> list[int]:
        """Every worker's ``size`` (e.g. its local batch size), in rank order."""
        mine = torch.tensor([size], dtype=torch.int64, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        self._call("all_gather", dist.all_gather, everyone, mine, nbytes=8)
        return [int(c.item()) for c in everyone]

    def all_gather_rows(self, rows: Tensor) -> Tensor:
        """Every worker's ``rows`` (``(m_w, ...)``) stacked along dim 0 in rank order:
        ``(Σ_w m_w, ...)``. Workers may hold different numbers of rows."""
        sizes = self.batch_sizes(rows.shape[0])
        most = max(sizes)
        padded = rows.new_zeros((most, *rows.shape[1:]), device=self.device)
        padded[: rows.shape[0]] = rows.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._call(
            "all_gather",
            dist.all_gather,
            parts,
            padded,
            nbytes=padded.numel() * padded.element_size(),
        )
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(rows.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every worker's small picklable ``obj``, in rank order (set-up checks only)."""
        out: list[Any] = [None] * self.world_size
        self._call("all_gather", dist.all_gather_object, out, obj)
        return out


def _float_dtype(value: Value) -> torch.dtype | None:
    if isinstance(value, Tensor):
        return value.dtype if value.is_floating_point() else None
    if isinstance(value, float):
        return torch.float64
    return None
