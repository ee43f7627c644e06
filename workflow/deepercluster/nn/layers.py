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
    rank's own batch statistics would be those of a single class. The gradient flows through
    the global statistics too: its backward all-reduces the per-channel sums it needs.

    The per-channel sums are accumulated in float64, so the statistics do not depend on how the
    global batch is split over ranks: one rank and many compute the same normalised activations,
    bit for bit (float32 sums of 40 images or of 2 x 20 round differently, and a max-pool near-tie
    then routes a gradient elsewhere). Each sample's sums over its map are float32 (they do not
    depend on the split either); only those B x C sums are added in float64, where adding float32
    values is exact in practice, so the activations are never copied to float64. Forward and backward
    are each one affine pass, ``x * a + b`` (as torch's own CPU BatchNorm computes it), with the
    coefficients from the global sums: ``_GlobalBatchNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        y, mean, var, n = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.to(x.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(x.dtype), self.momentum)
        return y


def _channel_sums(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per channel, the sums over the batch of ``u`` and of ``u * v`` (2C, float64): each sample's in float32, then
    those B values in float64 (the same on any split of the batch)."""
    per_sample = torch.cat([u.sum((2, 3)), (u * v).sum((2, 3))], 1)
    return per_sample.sum(0, dtype=torch.float64)


def _per_channel(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coefficient.to(like.dtype).view(1, -1, 1, 1)


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with mean and var over every rank's batch; returns
    (y, mean, var, images x pixels over all ranks), the last three not differentiable."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
        total = all_reduce_sum(torch.cat([_channel_sums(x, x), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels:-1] / n - mean * mean
        inverse_std = 1 / torch.sqrt(var + eps)
        scale = weight * inverse_std
        ctx.save_for_backward(x, mean, inverse_std, scale, n)
        ctx.mark_non_differentiable(mean, var, n)
        return torch.addcmul(_per_channel(bias - mean * scale, x), x, _per_channel(scale, x)), mean, var, n

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        # With x_hat = (x - mean) * inverse_std and sums over every rank's batch (N values per channel):
        # dx = scale * (dy - sum(dy) / N - x_hat * sum(dy * x_hat) / N), one affine pass in x and dy;
        # d weight and d bias are this rank's own sums (the ranks' parameter gradients are reduced by the trainer).
        x, mean, inverse_std, scale, n = ctx.saved_tensors
        channels = x.shape[1]
        local = _channel_sums(dy, x)
        dy_sum, dy_x = local[:channels], local[channels:]
        total = all_reduce_sum(local.clone())
        dy_x_hat = inverse_std * (total[channels:] - mean * total[:channels])
        x_coefficient = -scale * inverse_std * dy_x_hat / n
        constant = -scale * total[:channels] / n - x_coefficient * mean
        dx = torch.addcmul(_per_channel(constant, x), x, _per_channel(x_coefficient, x))
        dx.addcmul_(dy, _per_channel(scale, x))
        d_weight = (inverse_std * (dy_x - mean * dy_sum)).to(x.dtype)
        return dx, d_weight, dy_sum.to(x.dtype), None


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
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        target: torch.Tensor,
        first: int,
        group: dist.ProcessGroup | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
