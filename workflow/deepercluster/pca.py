"""PCA-whitening fitted on a bounded sample streamed from the shards, then L2 normalisation.

Memory is O(d^2 + one chunk) whatever the number of images: the sample is reduced to a
running sum and a running x^T x, never gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from deepercluster.errors import ShardError
from deepercluster.files import atomic_output
from deepercluster.logs import progress
from deepercluster.shards import open_shard, read_chunks, shard_rows

log = logging.getLogger(__name__)


@dataclass
class Whitening:
    """x -> L2-normalise((x - mean) @ projection), projection = eigenvectors * eigenvalue^-1/2."""

    mean: np.ndarray  # [d_in]
    projection: np.ndarray  # [d_in, d_out]
    eigenvalues: np.ndarray  # [d_out], after the floor

    @property
    def dim(self) -> int:
        return self.projection.shape[1]

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Whitened features before L2: unit variance along every kept direction on the fitted sample."""
        return ((x - self.mean) @ self.projection).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        w = self.whiten(x)
        return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)

    @classmethod
    def load(cls, path: str) -> Whitening:
        with h5py.File(path, "r") as f:
            return cls(f["mean"][:], f["projection"][:], f["eigenvalues"][:])


def sample_rows(counts: Sequence[int], sample_size: int, seed: int) -> np.ndarray:
    """Sorted global row positions of a seeded uniform sample without replacement."""
    total = int(sum(counts))
    size = min(sample_size, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))


def fit_pca(
    *,
    shards: list[str],
    out: str,
    dim: int | None = None,
    sample_size: int = 100_000,
    seed: int = 0,
    eigenvalue_floor: float = 1e-5,
) -> None:
    """Stage 'pca': fit the whitening on a sample of ``sample_size`` rows and write ``pca.h5``.

    Eigenvalues are floored at ``eigenvalue_floor`` x the largest; ``dim`` keeps that many
    leading directions (None keeps all, as DeeperCluster does; DeepCluster keeps 256).
    """
    checkpoints = set()
    for path in shards:
        with open_shard(path) as f:
            checkpoints.add(f.attrs["checkpoint_sha256"])
    if len(checkpoints) != 1:
        raise ShardError(
            f"the shards {shards[0]}, ... come from {len(checkpoints)} different checkpoints: "
            "delete them and rerun their extraction"
        )
    counts = [shard_rows(p) for p in shards]
    chosen = sample_rows(counts, sample_size, seed)
    log.info("PCA on %d of %d rows from %d shards", len(chosen), sum(counts), len(shards))

    total, sum_x, sum_xxt, offset = 0, None, None, 0
    for ids, x in progress(read_chunks(shards), "pca sample", unit="chunk"):
        picked = chosen[(chosen >= offset) & (chosen < offset + len(ids))] - offset
        offset += len(ids)
        xs = x[picked].astype(np.float64)
        if sum_x is None:
            sum_x, sum_xxt = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        sum_x += xs.sum(0)
        sum_xxt += xs.T @ xs
        total += len(xs)
    if total < 2:
        raise ShardError(f"PCA needs at least 2 rows, the shards {shards[0]}, ... hold {total}: give it more images")
    mean = sum_x / total
    covariance = (sum_xxt - total * np.outer(mean, mean)) / (total - 1)

    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][: dim or len(eigenvalues)]
    floored = np.maximum(eigenvalues[order], eigenvalue_floor * eigenvalues.max())
    projection = eigenvectors[:, order] / np.sqrt(floored)
    log.info(
        "kept %d of %d directions, %.1f%% of the variance",
        len(order),
        len(eigenvalues),
        100 * eigenvalues[order].sum() / eigenvalues.sum(),
    )

    with atomic_output(out) as partial, h5py.File(partial, "w") as f:
        f["mean"] = mean.astype(np.float32)
        f["projection"] = projection.astype(np.float32)
        f["eigenvalues"] = floored.astype(np.float32)
        f.attrs.update(
            checkpoint_sha256=checkpoints.pop(),
            sample_size=total,
            seed=seed,
            eigenvalue_floor=eigenvalue_floor,
        )
