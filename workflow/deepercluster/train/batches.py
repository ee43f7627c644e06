"""What each rank draws: the ranks' layout, the images' clusters, a sampler uniform over the clusters of this
rank's training group, and the group's batches cut into the ranks' shares.

Ranks (DeeperCluster, section "Distributed training"): when the number of ranks is a multiple of the
number of super-classes, ranks form one training group per super-class and each rank of group g sees only
super-class g's images at its rotation. Otherwise (fewer ranks than groups: one process on a laptop) every
rank takes its share of each global batch. Augmentation is seeded per sample from (seed, epoch, group,
position), so it depends neither on DataLoader workers nor on where the block was interrupted nor on how
many ranks share a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from deepercluster.data.images import ImageDataset
from deepercluster.errors import TrainingInputError
from deepercluster.formats.labels import Labels, labels_file, read_labels
from deepercluster.formats.manifest import manifest_size, read_manifest_ids
from deepercluster.methods import Method
from deepercluster.nn.heads import Targets
from deepercluster.seeds import derived_seed, id_hash
from deepercluster.train.sampler import UniformClusterSampler


@dataclass(frozen=True)
class Layout:
    """How the ranks share a block: ``groups`` training groups; this rank is ``part`` of the ``parts`` of ``group``."""

    groups: int
    group: int
    part: int
    parts: int

    @property
    def head_part(self) -> tuple[int, int]:
        """(part, parts) of W_g's classes this rank holds: the group's ranks split them in the paper's layout;
        (0, 1), every class, when every rank holds every head (one group)."""
        return (self.part, self.parts) if self.groups > 1 else (0, 1)


def layout_for(targets: Targets, rank: int, world_size: int) -> Layout:
    """The paper's layout (a group per super-class) when the ranks divide evenly, else one group of all ranks."""
    groups = targets.super_classes
    if world_size > 1 and groups > 1 and world_size % groups == 0:
        parts = world_size // groups
        return Layout(groups, rank // parts, rank % parts, parts)
    return Layout(1, 0, rank, world_size)


def group_images(manifest: str, labels: str | None, method: Method, layout: Layout) -> tuple[pd.DataFrame, Labels]:
    """The images this rank's training group draws from (``read_manifest_ids``' rows, in the manifest's order) and
    their labels: its super-cluster's alone in the paper's layout, read without the other rows (every image when
    the group is all of them); without labels (RotNet) every image, in one cluster."""
    if labels is None:
        images = read_manifest_ids(manifest, np.arange(manifest_size(manifest)))  # a manifest's ids are 0..N-1
        return images, Labels(pd.DataFrame({"id": images["id"], "super_cluster": 0, "sub_cluster": 0}), [1])
    found = read_labels(labels, layout.group // method.rotations if layout.groups > 1 else None)
    labelled = found.table["id"].to_numpy()
    images = read_manifest_ids(manifest, labelled)
    if len(images) < len(labelled) or labels_file(labels)[0].metadata.num_rows != manifest_size(manifest):
        raise TrainingInputError(f"{labels} does not label the images of {manifest}: rerun the round's labels stage")
    order = np.argsort(labelled)  # each image's row of the labels, by a binary search of its id
    rows = order[np.searchsorted(labelled, images["id"].to_numpy(), sorter=order)]
    table = found.table.iloc[rows].reset_index(drop=True)
    return images, Labels(table.astype(np.int64), found.sub_clusters)


def group_sampler(method: Method, layout: Layout, clusters: Labels, images: int, seed: int) -> UniformClusterSampler:
    """Uniform over the clusters of this rank's group, ``clusters`` being its images' (``group_images``): its
    super-cluster's images at its rotation (super-class g = super-cluster g // rotations at rotation
    g % rotations); ``images`` / groups draws an epoch, ``images`` the round's number of images."""
    table = clusters.table
    flat = table["super_cluster"].to_numpy() * max(clusters.sub_clusters) + table["sub_cluster"].to_numpy()
    rotations = [layout.group % method.rotations] if layout.groups > 1 else list(range(method.rotations))
    return UniformClusterSampler(
        flat, rotations=rotations, seed=derived_seed(seed, layout.group), draws=images // layout.groups
    )


class RotatedImages(Dataset):
    """Item (index, rotation, sample_seed) -> (augmented image turned by rotation x 90 degrees, index, rotation)."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
        index, rotation, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (the transforms'): torch.manual_seed would also queue a CUDA/XPU/MPS
            # seeding, formatting a stack trace for each, and reseed the GPU's dropout generator
            torch.default_generator.manual_seed(sample_seed)
            image, _ = self.images[index]
        return torch.rot90(image, rotation, dims=(1, 2)), index, rotation


class RankBatches(Sequence):
    """This rank's share of each of the group's batches from batch ``start`` on, as (index, rotation, sample_seed).

    Batches are made when asked for, so an epoch costs no Python work per sample up front; each
    sample's augmentation seed is a splitmix64 key of (seed, epoch, group, position), vectorised.
    The last incomplete batch is dropped.
    """

    def __init__(
        self,
        indices: np.ndarray,
        rotations: np.ndarray,
        group_batch: int,
        layout: Layout,
        start: int,
        seed: int,
        epoch: int,
    ) -> None:
        self.indices, self.rotations, self.group_batch, self.start = indices, rotations, group_batch, start
        self.share = group_batch // layout.parts
        self.offset = layout.part * self.share
        self.stream = derived_seed(seed, epoch, layout.group)

    def __len__(self) -> int:
        return len(self.indices) // self.group_batch - self.start

    def __getitem__(self, b: int) -> list[tuple[int, int, int]]:
        if not 0 <= b < len(self):
            raise IndexError(b)
        first = (self.start + b) * self.group_batch + self.offset
        positions = np.arange(first, first + self.share)
        seeds = id_hash(positions, self.stream)
        return list(
            zip(self.indices[positions].tolist(), self.rotations[positions].tolist(), seeds.tolist(), strict=True)
        )
