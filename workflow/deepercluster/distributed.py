"""The one place that joins ranks into a process group and reads rank variables (torchrun's, SLURM's, submitit's,
or none: one process), and the plain collectives every stage reduces through.

Every other module asks ``get_rank()``/``get_world_size()`` and reduces through ``all_reduce_sum``, which
is the identity on one process: one code path for a laptop and for 64 GPUs. Process groups smaller than
the world (a DeeperCluster training group, which alone holds its sub-class head) are made here too, by
``group_of_ranks``. The processes themselves are started by ``deepercluster.launch``.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import submitit
import torch
import torch.distributed as dist
from submitit.helpers import TorchDistributedEnvironment
from torch import nn

log = logging.getLogger(__name__)

# How long a rank waits for the others, to join or in one collective, before it fails: a peer that died
# without closing its sockets (its node cut off) ends the stage within this bound, not torch's default
# (30 minutes with gloo). Long enough for one rank's longest work alone while the others wait (a save, a
# k-means pass over a rank's share); DEEPERCLUSTER_COLLECTIVE_TIMEOUT_S sets it, in seconds.
COLLECTIVE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device


def _export_rank_variables() -> None:
    """RANK, WORLD_SIZE, MASTER_ADDR... from submitit's view of a SLURM or submitit job, when not set yet."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # torchrun, or an earlier export
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # plain srun tasks: read them as submitit does
    try:
        environment = submitit.JobEnvironment()
    except RuntimeError:
        return  # not a SLURM or submitit job: a world of one
    if environment.num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed() -> Distributed:
    """Join the process group when launched as several ranks; otherwise a world of one.

    Ranks come from torchrun's variables, or from the SLURM (or submitit) job environment
    through ``submitit.helpers.TorchDistributedEnvironment``. NCCL on GPUs, gloo on CPUs;
    rendezvous through env:// (MASTER_ADDR, MASTER_PORT): in a SLURM job, the first node of the
    job's node list (``SLURM_JOB_NODELIST``) and a port drawn from the job id.
    """
    _export_rank_variables()
    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Distributed(0, 1, torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        timeout = int(os.environ.get("DEEPERCLUSTER_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT_S))
        dist.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        atexit.register(_leave_process_group)
        log.info(
            "rank %d of %d on %s joined the process group (%s) at %s:%s, collective timeout %d s",
            rank,
            world_size,
            socket.gethostname(),
            dist.get_backend(),
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
            timeout,
        )
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Distributed(rank, world_size, device)


def _leave_process_group() -> None:
    """Leave the process group before the interpreter exits. Left to torch's teardown, a gloo group whose
    peers on another node had already exited aborted its rank ("terminate called without an active
    exception") after the stage's work was done, and srun's --kill-on-bad-exit then ended the others."""
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def group_of_ranks(size: int) -> dist.ProcessGroup | None:
    """This rank's process group when the world is cut into consecutive sets of ``size`` ranks (ranks
    0..size-1, then size..2 size-1...); None, meaning the world, when one set is the whole world.

    Every rank takes part in creating every set's group (``torch.distributed.new_group`` is collective).
    """
    world_size = get_world_size()
    if size == world_size:
        return None
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world_size, size)]
    return groups[get_rank() // size]


def group_size(group: dist.ProcessGroup | None) -> int:
    """The number of ranks of ``group`` (None: the world)."""
    return get_world_size() if group is None else dist.get_world_size(group)


def barrier() -> None:
    """Wait for every rank (nothing to wait for on one process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (None: all ranks) in place (identity on one process)
    and return it."""
    if group_size(group) > 1:
        if dist.get_backend() == "nccl":
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu, group=group)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, group=group)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects(obj: object) -> list[object] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others (``[obj]`` on one process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[object] | None = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The ``tensor`` of every rank of ``group`` (None: all ranks; the same shape on each), concatenated
    along the first dimension in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def synchronise_gradients(parameters: list[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Average each parameter's gradient over the ranks of ``group`` (None: all ranks), in one all-reduce.

    A parameter no rank computed a gradient for keeps ``grad = None`` (SGD then skips it, as
    on one process); one that only some ranks used counts zeros for the others.
    """
    ranks = group_size(group)
    if ranks == 1 or not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    used = torch.tensor([float(p.grad is not None) for p in parameters], device=grads[0].device)
    flat = all_reduce_sum(torch.cat([*(g.flatten() for g in grads), used]), group)
    used, offset = flat[-len(parameters) :], 0
    for p, was_used in zip(parameters, used.tolist(), strict=True):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p) / ranks if was_used else None
        offset += n
