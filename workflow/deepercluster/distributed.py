"""The one place that starts ranks and reads rank variables: torchrun, SLURM tasks, or one process.

Every other module asks ``get_rank()``/``get_world_size()`` and reduces through
``all_reduce_sum``, which is the identity on one process: one code path for a laptop
and for 64 GPUs. Process groups smaller than the world (a DeeperCluster training group,
which alone holds its sub-class head) are made here too, by ``group_of_ranks``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import submitit
import torch
import torch.distributed as dist
from submitit.helpers import TorchDistributedEnvironment
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


# Set in the processes that ``rank_command`` starts, so that they run the stage instead of starting ranks again.
RANK_PROCESS = "DEEPERCLUSTER_RANK_PROCESS"


def rank_command(tasks: int, argv: list[str]) -> list[str] | None:
    """The command that runs ``python -m deepercluster argv`` as ``tasks`` ranks, or None when this
    process should run the stage itself (one task, or already one of the ranks).

    Inside a SLURM allocation the ranks are SLURM tasks (``srun``); elsewhere, local processes
    (``torch.distributed.run``, i.e. torchrun).
    """
    if tasks <= 1 or os.environ.get(RANK_PROCESS):
        return None
    stage = [sys.executable, "-m", "deepercluster", *argv]
    if "SLURM_JOB_ID" in os.environ:
        return ["srun", f"--ntasks={tasks}", "--kill-on-bad-exit=1", *stage]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tasks}", *stage[1:]]


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
    rendezvous through env:// (MASTER_ADDR, MASTER_PORT).
    """
    _export_rank_variables()
    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Distributed(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
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


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are over every rank's batch, on CPU (gloo) and GPU alike.

    DeeperCluster needs it: the ranks of a training group see one super-class each, so a
    rank's own batch statistics would be those of a single class. The sums travel through
    a differentiable all-reduce, so gradients flow through the global statistics.

    The sums are accumulated in float64, where adding float32 values is exact in practice, so
    the statistics do not depend on how the global batch is split over ranks: one rank and
    many compute the same normalised activations, bit for bit (float32 sums of 40 images or
    of 2 x 20 round differently, and a max-pool near-tie then routes a gradient elsewhere).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
        sums = [x.sum((0, 2, 3), dtype=torch.float64), (x * x).sum((0, 2, 3), dtype=torch.float64)]
        total = differentiable_all_reduce(torch.cat([*sums, count]))
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels : 2 * channels] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.to(x.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(x.dtype), self.momentum)
        shape = (1, channels, 1, 1)
        scale = (self.weight / torch.sqrt(var + self.eps)).to(x.dtype)
        return (x - mean.to(x.dtype).view(shape)) * scale.view(shape) + self.bias.view(shape)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` by a ``GlobalBatchNorm2d`` holding the same state
    (on one rank too: one code path, whatever the number of ranks)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced.to(child.weight.device))
        else:
            global_batchnorm(child)
    return module


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor.clone())

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


def differentiable_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, through which gradients flow back to every rank."""
    return _AllReduceSum.apply(tensor)


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The ``tensor`` of every rank of ``group`` (None: all ranks; the same shape on each), concatenated
    along the first dimension in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class _AllGather(torch.autograd.Function):
    """``all_gather``; a rank's rows then feed every rank's loss, so their gradient is the sum of every rank's."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor, group: dist.ProcessGroup | None
    ) -> torch.Tensor:
        ctx.group, ctx.rows = group, len(tensor)
        return all_gather(tensor, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        first = dist.get_rank(ctx.group) * ctx.rows
        return all_reduce_sum(grad.contiguous().clone(), ctx.group)[first : first + ctx.rows], None


def differentiable_all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``tensor`` (see ``all_gather``), through which gradients flow back to the rank it came from."""
    return _AllGather.apply(tensor, group)


class _ShardedCrossEntropy(torch.autograd.Function):
    """The cross-entropy of each row over classes split between the ranks of a group (a model-parallel softmax).

    A rank holds the ``logits`` of its classes ``first``... for every row; the rows' maximum logit,
    sum of exponentials and target logit are all-reduced inside the group, so every rank returns
    every row's loss and predicted class (the first class of the highest logit, as ``argmax``).
    The losses being the same on every rank, the gradient of this rank's logits is that of the sum
    of every rank's use of them: the upstream gradients are summed over the group.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, target: torch.Tensor, first: int,
        group: dist.ProcessGroup | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        rows, classes = logits.shape
        local = target - first
        mine = (local >= 0) & (local < classes)
        if classes:
            top, arg = logits.max(1)
        else:  # fewer classes than ranks: this rank holds none
            top, arg = logits.new_full((rows,), -torch.inf), target.new_zeros(rows)
        high = top.clone()
        dist.all_reduce(high, dist.ReduceOp.MAX, group=group)
        exp = (logits - high[:, None]).exp()
        picked = logits.new_zeros(rows)
        picked[mine] = logits[mine, local[mine]] - high[mine]
        sums = torch.stack([exp.sum(1), picked])
        dist.all_reduce(sums, group=group)
        predicted = torch.where(top == high, arg + first, torch.iinfo(torch.int64).max)
        dist.all_reduce(predicted, dist.ReduceOp.MIN, group=group)
        ctx.save_for_backward(exp / sums[0][:, None], local, mine)
        ctx.group = group
        ctx.mark_non_differentiable(predicted)
        return sums[0].log() - sums[1], predicted

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        softmax, local, mine = ctx.saved_tensors
        grad = all_reduce_sum(grad.clone(), ctx.group)
        grad_logits = softmax * grad[:, None]
        grad_logits[mine, local[mine]] -= grad[mine]
        return grad_logits, None, None, None


def sharded_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, first: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy and predicted class over the classes of every rank of ``group``, of which this
    rank holds the ``logits`` of classes ``first``...; the same on every rank of the group."""
    return _ShardedCrossEntropy.apply(logits, target, first, group)
