"""PCA-whitening fitted on a bounded sample read from the shards, then L2 normalisation.

``fit_whitening`` is the fit itself, over any rows given chunk by chunk (the pca stage's sample, or the
R-MAC evaluation's region vectors). Memory is O(d^2 + one chunk) whatever the number of rows: they are
reduced to a running sum and a running x^T x, never gathered. The stage reads only the sampled rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from deepercluster.errors import ShardError
from deepercluster.files import sha256
from deepercluster.formats.features import read_rows, require_checkpoint, shard_dim, shard_rows
from deepercluster.formats.whitening import Whitening
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


def fit_whitening(chunks: Iterable[np.ndarray], dim: int | None, eigenvalue_floor: float) -> tuple[Whitening, int]:
    """(the PCA-whitening of the rows of ``chunks``, the number of rows); fewer than 2 rows raise ``ValueError``.

    Eigenvalues are floored at ``eigenvalue_floor`` x the largest; ``dim`` keeps that many leading
    directions (None keeps all).
    """
    total, sum_x, sum_xxt = 0, None, None
    for xs in chunks:
        xs = xs.astype(np.float64)
        if sum_x is None:
            sum_x, sum_xxt = np.zeros(xs.shape[1]), np.zeros((xs.shape[1], xs.shape[1]))
        sum_x += xs.sum(0)
        sum_xxt += xs.T @ xs
        total += len(xs)
    if total < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {total}")
    mean = sum_x / total
    covariance = (sum_xxt - total * np.outer(mean, mean)) / (total - 1)

    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][: dim or len(eigenvalues)]
    floored = np.maximum(eigenvalues[order], eigenvalue_floor * eigenvalues.max())
    log.info(
        "kept %d of %d directions, %.1f%% of the variance",
        len(order),
        len(eigenvalues),
        100 * eigenvalues[order].sum() / eigenvalues.sum(),
    )
    return Whitening(mean, eigenvectors[:, order] / np.sqrt(floored), floored), total


def fit_pca(
    *,
    shards: list[str],
    checkpoint: str,
    out: str,
    dim: int | None,
    fraction: float,
    sample_size: int,
    seed: int,
    eigenvalue_floor: float,
) -> None:
    """Stage 'pca': fit the whitening on a sample of ``sample_size`` rows of ``shards``, the features of
    ``checkpoint`` (every shard must say so), and write ``pca.h5``.

    ``dim`` keeps that many leading directions; None keeps ``fraction`` of the feature's (DeeperCluster all of
    them, DeepCluster 1/16).
    """
    checkpoint_sha256 = sha256(checkpoint)
    require_checkpoint(shards, checkpoint_sha256, checkpoint)
    counts = [shard_rows(p) for p in shards]
    chosen = sample_rows(counts, sample_size, seed)
    log.info("PCA on %d of %d rows from %d shards", len(chosen), sum(counts), len(shards))
    if len(chosen) < 2:
        raise ShardError(
            f"PCA needs at least 2 rows, the shards {shards[0]}, ... hold {len(chosen)}: give it more images"
        )
    rows = progress(sampled_rows(shards, counts, chosen), "pca sample", unit="chunk")
    whitening, total = fit_whitening(rows, dim or max(1, round(fraction * shard_dim(shards[0]))), eigenvalue_floor)
    whitening.save(
        out, checkpoint_sha256=checkpoint_sha256, sample_size=total, seed=seed, eigenvalue_floor=eigenvalue_floor
    )
