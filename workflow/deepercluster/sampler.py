"""Uniform sampling over clusters, as both papers do against collapsed clusters.

Each epoch draws N samples: every cluster gets N / (number of clusters) draws (the
remainder spread one by one over random clusters), without
replacement when it is large enough and with replacement only when it is smaller. The
order is a pure function of (seed, epoch), so a resumed block replays it from any
position.
"""

from __future__ import annotations

import numpy as np

from deepercluster.objectives import ROTATIONS


class UniformClusterSampler:
    """(image index, rotation) pairs for one epoch, uniform over clusters.

    Args:
        clusters: the cluster of each image (any integers; one value for RotNet).
        rotate: draw a rotation in 0..3 per sample (else always 0).
        seed: the round's seed; each epoch reseeds from (seed, epoch).
    """

    def __init__(self, clusters: np.ndarray, rotate: bool, seed: int) -> None:
        self.clusters = np.asarray(clusters)
        self.rotate, self.seed = rotate, seed
        self.members = [np.flatnonzero(self.clusters == c) for c in np.unique(self.clusters)]

    def __len__(self) -> int:
        return len(self.clusters)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, rotations) of ``epoch``, both of length N."""
        rng = np.random.default_rng([self.seed, epoch])
        draws_per_cluster = np.full(len(self.members), len(self) // len(self.members))
        draws_per_cluster[rng.permutation(len(self.members))[: len(self) % len(self.members)]] += 1
        draws = [
            rng.choice(members, size=n, replace=len(members) < n)
            for members, n in zip(self.members, draws_per_cluster, strict=True)
        ]
        indices = rng.permutation(np.concatenate(draws))
        rotations = rng.integers(0, ROTATIONS, size=len(indices)) if self.rotate else np.zeros_like(indices)
        return indices, rotations
