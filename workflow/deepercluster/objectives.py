"""The three methods' targets, heads and losses on top of the backbone's feature.

- DeeperCluster (Eq. 5): a super-class head V over 4m classes (super-cluster x rotation)
  plus, for each super-class, a sub-class head W_s over the k sub-clusters of its
  super-cluster. Loss = CE(V) + CE(W_s).
- DeepCluster: one head over the k clusters (m = 1, no rotation).
- RotNet: a 4-way rotation head (one cluster).

Heads put ReLU then a Linear (N(0, 0.01) init) on the feature; they are created anew for
each round, the backbone carries over. A rank builds only the sub-class heads it ``holds``
(in the paper's layout, its training group's W_g): the others would be 4m - 1 heads of
k x feature_dim weights it never uses.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from deepercluster.methods import METHODS, clusters

ROTATIONS = 4  # 0, 90, 180, 270 degrees


@dataclass(frozen=True)
class Targets:
    """What a method predicts: ``super_classes`` classes for V, ``sub_classes[g]`` for W_g."""

    method: str
    super_classes: int
    sub_classes: tuple[int, ...]

    @property
    def rotates(self) -> bool:
        return self.method != "deepcluster"


def targets_for(method: str, sub_clusters_per_super: list[int]) -> Targets:
    """The targets of ``method`` given the number of sub-clusters of each super-cluster.

    RotNet ignores the clusters: 4 rotation classes and no sub-class heads.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not clusters(method):
        return Targets(method, ROTATIONS, ())
    if method == "deepcluster":
        if len(sub_clusters_per_super) != 1:
            raise ValueError(f"deepcluster needs 1 super-cluster, the labels have {len(sub_clusters_per_super)}")
        return Targets(method, 1, tuple(sub_clusters_per_super))
    per_class = [k for k in sub_clusters_per_super for _ in range(ROTATIONS)]
    return Targets(method, ROTATIONS * len(sub_clusters_per_super), tuple(per_class))


def super_class(targets: Targets, super_cluster: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """The super-class of each sample: (super-cluster, rotation) for DeeperCluster, the rotation for RotNet."""
    if targets.method == "rotnet":
        return rotation
    if targets.method == "deepcluster":
        return torch.zeros_like(super_cluster)
    return super_cluster * ROTATIONS + rotation


def linear_head(in_features: int, classes: int, device: str = "cpu") -> nn.Sequential:
    head = nn.Sequential(nn.ReLU(inplace=False), nn.Linear(in_features, classes, device=device))
    nn.init.normal_(head[1].weight, 0, 0.01)
    nn.init.zeros_(head[1].bias)
    return head


def skip_linear_head(in_features: int, classes: int, chunk: int = 1 << 16) -> None:
    """Draw from the CPU RNG what ``linear_head(in_features, classes)`` draws, keeping nothing.

    ``nn.Linear`` draws its weight and bias uniformly, then the weight is redrawn N(0, 0.01):
    one draw per uniform element, and ``normal_`` draws one per element plus 16 when the count
    is not a multiple of 16 (never below 16 elements but in one go), so chunks that are
    multiples of 16 with a last one of 16 or more draw exactly the same numbers.
    """
    n = in_features * classes
    bounds = [*range(0, n, chunk), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 16:
        bounds.pop(-2)
    sizes = [b - a for a, b in pairwise(bounds)]
    scratch = torch.empty(max(sizes))
    for size in sizes:
        scratch[:size].uniform_()  # nn.Linear's weight
    torch.empty(classes).uniform_()  # nn.Linear's bias
    for size in sizes:
        scratch[:size].normal_()


class Heads(nn.Module):
    """V (``super_class``, absent for DeepCluster where it has one class) and the W_g this rank ``holds``
    (``sub_class``, by super-class: all of them when ``holds`` is None), on the CPU or, to measure
    their sizes without allocating them, on the meta device.

    Every head is drawn from the RNG in the order V, W_0, W_1...: a head not held is skipped
    by drawing what it would draw, so that each head held is the one a rank holding every
    head builds, bit for bit.
    """

    def __init__(
        self, feature_dim: int, targets: Targets, holds: Collection[int] | None = None, device: str = "cpu"
    ) -> None:
        super().__init__()
        self.targets = targets
        super_classes = targets.super_classes
        self.super_class = linear_head(feature_dim, super_classes, device) if super_classes > 1 else None
        self.sub_class = nn.ModuleDict()
        for g, k in enumerate(targets.sub_classes):
            if holds is None or g in holds:
                self.sub_class[str(g)] = linear_head(feature_dim, k, device)
            elif device != "meta":  # the meta device draws nothing
                skip_linear_head(feature_dim, k)

    def forward(
        self, feature: torch.Tensor, super_target: torch.Tensor, sub_target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Losses (mean over the batch) and accuracies of each head present."""
        out: dict[str, torch.Tensor] = {}
        if self.super_class is not None:
            logits = self.super_class(feature)
            out["loss_super"] = F.cross_entropy(logits, super_target)
            out["acc_super"] = (logits.argmax(1) == super_target).float().mean()
        if len(self.sub_class):
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
