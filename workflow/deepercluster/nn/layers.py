"""Layers that make many ranks compute what one rank would, on CPU (gloo) and GPU (NCCL) alike: BatchNorm over
the global batch, and the differentiable collectives and model-parallel softmax behind it and the sub-class heads."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from deepercluster.distributed import all_gather, all_reduce_sum


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are over every rank's batch, on CPU (gloo) and GPU alike.

    DeeperCluster needs it: the ranks of a training group see one super-class each, so a
    rank's own batch statistics would be those of a single class. The sums travel through
    a differentiable all-reduce, so gradients flow through the global statistics.

    The per-channel sums are accumulated in float64, so the statistics do not depend on how the
    global batch is split over ranks: one rank and many compute the same normalised activations,
    bit for bit (float32 sums of 40 images or of 2 x 20 round differently, and a max-pool near-tie
    then routes a gradient elsewhere). Each sample's sums over its map are float32 (they do not
    depend on the split either); only those B x C sums are added in float64, where adding float32
    values is exact in practice, so the activations are never copied to float64. The output is
    ``x * a + b`` in one pass, with ``a = weight / sqrt(var + eps)`` and ``b = bias - mean * a``
    (as torch's own CPU BatchNorm computes it).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
        per_sample = torch.cat([x.sum((2, 3)), (x * x).sum((2, 3))], 1)  # B x 2C, float32
        total = differentiable_all_reduce(torch.cat([per_sample.sum(0, dtype=torch.float64), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels : 2 * channels] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.to(x.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(x.dtype), self.momentum)
        scale = self.weight / torch.sqrt(var + self.eps)
        shift = (self.bias - mean * scale).to(x.dtype)
        shape = (1, channels, 1, 1)
        return torch.addcmul(shift.view(shape), x, scale.to(x.dtype).view(shape))


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
