"""The three methods' targets, heads and losses on top of the backbone's feature.

- DeeperCluster (Eq. 5): a super-class head V over 4m classes (super-cluster x rotation)
  plus, for each super-class, a sub-class head W_s over the k sub-clusters of its
  super-cluster. Loss = CE(V) + CE(W_s).
- DeepCluster: one head over the k clusters (m = 1, no rotation).
- RotNet: a 4-way rotation head (one cluster).

Heads put ReLU then a Linear (N(0, 0.01) init) on the feature; they are created anew for
each round, the backbone carries over. A rank builds only the sub-class heads it ``holds``
(in the paper's layout, its training group's W_g): the others would be 4m - 1 heads of
k x feature_dim weights it never uses; and of W_g only its ``part``, 1/p of the classes, when
the group's p ranks split it (the softmax is then taken over the group's ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from deepercluster.distributed import all_gather
from deepercluster.methods import Method
from deepercluster.nn.layers import differentiable_all_gather, sharded_cross_entropy


@dataclass(frozen=True)
class Targets:
    """What a method predicts: ``super_classes`` classes for V (1: no V), ``sub_classes[g]`` for W_g."""

    method: str
    super_classes: int
    sub_classes: tuple[int, ...]


def targets_for(method: Method, sub_clusters: list[int]) -> Targets:
    """The targets of ``method`` given k of each of its super-clusters (RotNet: one, ignored)."""
    if method.one_super_cluster and len(sub_clusters) != 1:
        raise ValueError(f"{method.name} needs 1 super-cluster, the labels have {len(sub_clusters)}")
    super_classes = method.super_classes(len(sub_clusters))
    return Targets(method.name, super_classes, method.sub_classes(sub_clusters))


def linear_head(in_features: int, classes: int, device: str = "cpu") -> nn.Sequential:
    head = nn.Sequential(nn.ReLU(inplace=False), nn.Linear(in_features, classes, device=device))
    nn.init.normal_(head[1].weight, 0, 0.01)
    nn.init.zeros_(head[1].bias)
    return head


def class_part(classes: int, part: int, parts: int) -> range:
    """The classes of ``part`` when ``classes`` are split into ``parts`` consecutive runs of (nearly) equal size."""
    return range(classes * part // parts, classes * (part + 1) // parts)


def draw_linear_rows(in_features: int, classes: int, rows: range, chunk: int = 1 << 16) -> torch.Tensor:
    """The weight rows (classes) ``rows`` of the head ``linear_head(in_features, classes)`` draws, drawn from
    the CPU RNG as it draws them, in chunks: it keeps those rows and one chunk, and leaves the RNG
    where ``linear_head`` leaves it (no rows: the head is skipped).

    ``nn.Linear`` draws its weight and bias uniformly, then the weight is redrawn N(0, 0.01):
    one draw per uniform element, and ``normal_`` draws one per element plus 16 when the count
    is not a multiple of 16 (never below 16 elements but in one go), so chunks that are
    multiples of 16 with a last one of 16 or more draw exactly the same numbers.
    """
    n = in_features * classes
    bounds = [*range(0, n, chunk), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 16:
        bounds.pop(-2)
    scratch = torch.empty(max(b - a for a, b in pairwise(bounds)))
    kept, first, stop = torch.empty(len(rows), in_features), rows.start * in_features, rows.stop * in_features

    def draw(fill: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for a, b in pairwise(bounds):
            fill(scratch[: b - a])
            low, high = max(a, first), min(b, stop)
            if low < high:
                kept.view(-1)[low - first : high - first] = scratch[low - a : high - a]

    draw(torch.Tensor.uniform_)  # nn.Linear's weight
    torch.empty(classes).uniform_()  # nn.Linear's bias
    draw(lambda t: t.normal_(0, 0.01))
    return kept


def linear_head_rows(in_features: int, classes: int, rows: range) -> nn.Sequential:
    """The classes ``rows`` of ``linear_head(in_features, classes)``, bit for bit, without building the rest."""
    head = nn.Sequential(nn.ReLU(inplace=False), skip_init(nn.Linear, in_features, len(rows)))
    head[1].weight.data = draw_linear_rows(in_features, classes, rows)
    nn.init.zeros_(head[1].bias)
    return head


def sharded_sub_class(
    head: nn.Sequential, feature: torch.Tensor, target: torch.Tensor, first: int, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and predicted class of each of this rank's rows for a head whose classes are split over
    the ranks of ``group`` (``head`` holds classes ``first``...): every rank's features are gathered, each
    rank scores its classes on the group's rows, and the softmax is taken over every rank's classes."""
    rows, part = len(feature), dist.get_rank(group)
    gathered = differentiable_all_gather(head[0](feature), group)
    loss, predicted = sharded_cross_entropy(head[1](gathered), all_gather(target, group), first, group)
    own = slice(part * rows, (part + 1) * rows)
    return loss[own], predicted[own]


class Heads(nn.Module):
    """V (``super_class``, absent for DeepCluster where it has one class) and the W_g this rank ``holds``
    (``sub_class``, by super-class: all of them when ``holds`` is None), on the CPU or, to measure
    their sizes without allocating them, on the meta device.

    ``part`` = (part, parts) splits each W_g held by classes over the ``parts`` ranks of ``group``
    (the paper's training group, whose rows are all of super-class g): this rank holds the classes
    ``class_part(k, part, parts)`` and the sub-class loss is a softmax over every rank's classes.

    Every head is drawn from the RNG in the order V, W_0, W_1...: a head not held is skipped
    by drawing what it would draw, so that each head held, or each part of it, is the one a
    rank holding every head builds, bit for bit.
    """

    def __init__(
        self,
        feature_dim: int,
        targets: Targets,
        holds: Collection[int] | None = None,
        part: tuple[int, int] = (0, 1),
        group: dist.ProcessGroup | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.targets, (self.part, self.parts), self.group = targets, part, group
        super_classes = targets.super_classes
        self.super_class = linear_head(feature_dim, super_classes, device) if super_classes > 1 else None
        self.sub_class = nn.ModuleDict()
        for g, k in enumerate(targets.sub_classes):
            rows = class_part(k, *part)
            if holds is not None and g not in holds:
                if device != "meta":  # the meta device draws nothing
                    draw_linear_rows(feature_dim, k, range(0))
            elif len(rows) == k or device == "meta":
                self.sub_class[str(g)] = linear_head(feature_dim, len(rows), device)
            else:
                self.sub_class[str(g)] = linear_head_rows(feature_dim, k, rows)

    def forward(
        self, feature: torch.Tensor, super_target: torch.Tensor, sub_target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Losses (mean over the batch) and accuracies of each head present."""
        out: dict[str, torch.Tensor] = {}
        if self.super_class is not None:
            logits = self.super_class(feature)
            out["loss_super"] = F.cross_entropy(logits, super_target)
            out["acc_super"] = (logits.argmax(1) == super_target).float().mean()
        if self.parts > 1:
            ((g, head),) = self.sub_class.items()
            first = class_part(self.targets.sub_classes[int(g)], self.part, self.parts).start
            loss, predicted = sharded_sub_class(head, feature, sub_target, first, self.group)
            out["loss_sub"] = loss.sum() / len(feature)
            out["acc_sub"] = (predicted == sub_target).sum().float() / len(feature)
        elif len(self.sub_class):
            loss, correct = feature.new_zeros(()), feature.new_zeros(())
            for g in super_target.unique().tolist():
                rows = super_target == g
                logits = self.sub_class[str(g)](feature[rows])
                loss = loss + F.cross_entropy(logits, sub_target[rows], reduction="sum")
                correct = correct + (logits.argmax(1) == sub_target[rows]).sum()
            out["loss_sub"] = loss / len(feature)
            out["acc_sub"] = correct.float() / len(feature)
        out["loss"] = sum(v for k, v in out.items() if k.startswith("loss_"))
        return out
