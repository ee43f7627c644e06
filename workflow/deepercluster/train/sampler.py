"""Uniform sampling over clusters, as both papers do against collapsed clusters.

Each epoch draws ``draws`` samples: every cluster gets an equal share (the remainder
spread one by one over random clusters), drawn without replacement when the cluster is
large enough and with replacement only when it is smaller; each sample gets a rotation
drawn from ``rotations``. The order is a pure function of (seed, epoch), so a resumed
block replays it from any position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepercluster.seeds import derived_seed


class UniformClusterSampler:
    """(image index, rotation) pairs for one epoch, uniform over the clusters of ``images``.

    Args:
        clusters: the cluster of every image (any integers; one value for RotNet).
        images: the images to sample from (a training group's; all by default).
        rotations: the rotations (0..3, in quarter turns) to draw from uniformly.
        draws: samples per epoch (``len(images)`` by default).
        seed: each epoch reseeds from (seed, epoch).
    """

    def __init__(
        self,
        clusters: np.ndarray,
        *,
        rotations: Sequence[int],
        seed: int,
        images: np.ndarray | None = None,
        draws: int | None = None,
    ) -> None:
        clusters = np.asarray(clusters)
        if images is not None:
            images = np.asarray(images)
            clusters = clusters[images]
        self.members = cluster_members(clusters, images)
        self.rotations = np.asarray(rotations)
        self.draws = len(clusters) if draws is None else draws
        self.seed = seed

    def __len__(self) -> int:
        return self.draws

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, rotations) of ``epoch``, both of length ``draws``."""
        rng = np.random.default_rng(derived_seed(self.seed, epoch))
        per_cluster = np.full(len(self.members), self.draws // len(self.members))
        per_cluster[rng.permutation(len(self.members))[: self.draws % len(self.members)]] += 1
        draws = [
            rng.choice(members, size=n, replace=len(members) < n)
            for members, n in zip(self.members, per_cluster, strict=True)
        ]
        indices = rng.permutation(np.concatenate(draws))
        return indices, rng.choice(self.rotations, size=len(indices))


def cluster_members(clusters: np.ndarray, images: np.ndarray | None) -> list[np.ndarray]:
    """The images (``images``, or the positions of ``clusters`` when None) of each cluster, the clusters in
    ascending order and each one's images in their order: one stable sort, views of one array (8 bytes an image),
    not a pass over the images per cluster."""
    order = np.argsort(clusters, kind="stable")
    ranked = clusters[order]
    members = order if images is None else images[order]
    return np.split(members, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1) if len(order) else []
