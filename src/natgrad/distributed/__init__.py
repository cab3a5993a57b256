"""Data-parallel training on ``torch.distributed`` with K-FAC's work shared across workers.

::

    info = natgrad.distributed.init_from_env()          # under torchrun
    model = DistributedDataParallel(net.to(info.device))
    pre = natgrad.KFAC(net, opt, distributed=natgrad.distributed.DataParallel())

See docs/distributed.md for launching on one or several machines and for the cost model.
"""

from .assignment import WorkAssignment, balance, cubic_cost
from .comm import Collective, DistributedError, PeerFailed
from .data_parallel import SHARE_MODES, DataParallel
from .launch import WorldInfo, init_from_env, world_from_env

__all__ = [
    "Collective",
    "DataParallel",
    "DistributedError",
    "PeerFailed",
    "SHARE_MODES",
    "WorkAssignment",
    "WorldInfo",
    "balance",
    "cubic_cost",
    "init_from_env",
    "world_from_env",
]
