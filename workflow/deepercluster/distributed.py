"""The one place that reads rank variables: torchrun, SLURM tasks, or a single process.

Every other module asks ``get_rank()``/``get_world_size()`` and reduces through
``all_reduce_sum``, which is the identity on one process: one code path for a laptop
and for 64 GPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _rank_variables() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def init_distributed() -> Distributed:
    """Join the process group when launched as several ranks; otherwise a world of one.

    NCCL on GPUs, gloo on CPUs. Rendezvous through env:// (MASTER_ADDR, MASTER_PORT),
    which torchrun and ``submitit.helpers.TorchDistributedEnvironment().export()`` set.
    """
    ranks = _rank_variables()
    cuda = torch.cuda.is_available()
    if ranks is None or ranks[1] == 1:
        return Distributed(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size, local_rank = ranks
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
        log.info("rank %d of %d joined the process group (%s)", rank, world_size, dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Distributed(rank, world_size, local_rank, device)


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (identity on one process) and return it."""
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
