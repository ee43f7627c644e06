"""The methods, each one record: what its rounds cluster, whether it rotates, whether its heads carry over from
round to round, and how a sample's super-cluster and rotation make its super-class. Every other module asks the
record, never compares method names.

DeeperCluster (Eq. 5) predicts the super-class (super-cluster x rotation) with a head V over 4m classes,
and the sub-cluster with the head W_s of the sample's super-class. DeepCluster is its one-super-cluster
case without rotation: one head over the k clusters. RotNet clusters nothing: a 4-way rotation head.
``supervised`` is DeepCluster's head on the true classes: not a method of the papers but the bound of what a
training block can reach with perfect labels (its labels are the manifest's, used nowhere else).
"""

from __future__ import annotations

from dataclasses import dataclass

ROTATIONS = 4  # 0, 90, 180, 270 degrees


@dataclass(frozen=True)
class Method:
    name: str
    clusters: bool  # its rounds cluster the features (k-means, pseudo-labels); RotNet's and supervised's do not
    labelled: bool  # its block trains sub-class heads on labels: pseudo-labels, or the true classes (supervised)
    rotates: bool  # each image is turned by one of ROTATIONS quarter turns, part of its super-class
    one_super_cluster: bool  # m is 1 (DeepCluster, supervised; RotNet has no clusters)
    keeps_heads: bool  # its classes mean the same every round, so its heads carry over (RotNet, supervised)

    @property
    def rotations(self) -> int:
        """Rotations a super-cluster is split into: its super-classes (1 without rotation)."""
        return ROTATIONS if self.rotates else 1

    def super_classes(self, super_clusters: int) -> int:
        """Classes of the super-class head V: super-cluster x rotation (1: no such head)."""
        return super_clusters * self.rotations

    def super_class(self, super_cluster, rotation):
        """The super-class of each sample: its super-cluster's class at its rotation (RotNet: the rotation,
        its super-cluster being 0; DeepCluster: 0, its rotation being 0)."""
        return super_cluster * self.rotations + rotation

    def sub_classes(self, sub_clusters: list[int]) -> tuple[int, ...]:
        """Classes of each sub-class head W_g, g a super-class: the k of its super-cluster (RotNet: no W_g)."""
        if not self.labelled:
            return ()
        return tuple(sub_clusters[g // self.rotations] for g in range(self.super_classes(len(sub_clusters))))


METHODS = {
    "deepercluster": Method("deepercluster", True, True, rotates=True, one_super_cluster=False, keeps_heads=False),
    "deepcluster": Method("deepcluster", True, True, rotates=False, one_super_cluster=True, keeps_heads=False),
    "rotnet": Method("rotnet", False, False, rotates=True, one_super_cluster=True, keeps_heads=True),
    "supervised": Method("supervised", False, True, rotates=False, one_super_cluster=True, keeps_heads=True),
}


def method(name: str) -> Method:
    """The method named ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
