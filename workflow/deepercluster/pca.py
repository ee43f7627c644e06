"""PCA-whitening fitted on a bounded sample read from the shards, then L2 normalisation.

Only the sampled rows are read. Memory is O(d^2 + one chunk) whatever the number of
images: the sample is reduced to a running sum and a running x^T x, never gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from deepercluster.errors import ShardError
from deepercluster.formats import Whitening, read_rows, shard_checkpoint, shard_rows
from deepercluster.logs import progress

log = logging.getLogger(__name__)


def sample_rows(counts: Sequence[int], sample_size: int, seed: int) -> np.ndarray:
    """Sorted global row positions of a seeded uniform sample without replacement."""
    total = int(sum(counts))
    size = min(sample_size, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))


def sampled_rows(shards: list[str], counts: Sequence[int], chosen: np.ndarray) -> Iterator[np.ndarray]:
    """The raw features of the global row positions ``chosen`` (sorted), shard by shard, block by block."""
    starts = np.cumsum([0, *counts])
    for path, start, stop in zip(shards, starts[:-1], starts[1:], strict=True):
        yield from read_rows(path, chosen[(chosen >= start) & (chosen < stop)] - start)


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
    checkpoints = {shard_checkpoint(path) for path in shards}
    if len(checkpoints) != 1:
        raise ShardError(
            f"the shards {shards[0]}, ... come from {len(checkpoints)} different checkpoints: "
            "delete them and rerun their extraction"
        )
    counts = [shard_rows(p) for p in shards]
    chosen = sample_rows(counts, sample_size, seed)
    log.info("PCA on %d of %d rows from %d shards", len(chosen), sum(counts), len(shards))

    total, sum_x, sum_xxt = 0, None, None
    for xs in progress(sampled_rows(shards, counts, chosen), "pca sample", unit="chunk"):
        xs = xs.astype(np.float64)
        if sum_x is None:
            sum_x, sum_xxt = np.zeros(xs.shape[1]), np.zeros((xs.shape[1], xs.shape[1]))
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

    Whitening(mean, projection, floored).save(
        out, checkpoint_sha256=checkpoints.pop(), sample_size=total, seed=seed, eigenvalue_floor=eigenvalue_floor
    )
