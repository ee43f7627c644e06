"""The three methods' targets, heads and losses on top of the backbone's feature.

- DeeperCluster (Eq. 5): a super-class head V over 4m classes (super-cluster x rotation)
  plus, for each super-class, a sub-class head W_s over the k sub-clusters of its
  super-cluster. Loss = CE(V) + CE(W_s).
- DeepCluster: one head over the k clusters (m = 1, no rotation).
- RotNet: a 4-way rotation head (one cluster).

Heads put ReLU then a Linear (N(0, 0.01) init) on the feature; they are created anew for
each round, the backbone carries over.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def linear_head(in_features: int, classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.ReLU(inplace=False), nn.Linear(in_features, classes))
    nn.init.normal_(head[1].weight, 0, 0.01)
    nn.init.zeros_(head[1].bias)
    return head


class Heads(nn.Module):
    """V (``super_class``, absent for DeepCluster where it has one class) and the W_g (``sub_class``)."""

    def __init__(self, feature_dim: int, targets: Targets) -> None:
        super().__init__()
        self.targets = targets
        self.super_class = linear_head(feature_dim, targets.super_classes) if targets.super_classes > 1 else None
        self.sub_class = nn.ModuleList(linear_head(feature_dim, k) for k in targets.sub_classes)

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
                logits = self.sub_class[g](feature[rows])
                loss = loss + F.cross_entropy(logits, sub_target[rows], reduction="sum")
                correct = correct + (logits.argmax(1) == sub_target[rows]).sum()
            out["loss_sub"] = loss / len(feature)
            out["acc_sub"] = correct.float() / len(feature)
        out["loss"] = sum(v for k, v in out.items() if k.startswith("loss_"))
        return out
