"""Feature shards: the HDF5 boundary between extraction and clustering.

A shard ``shard-{i}.h5`` holds ``features`` (n x d float32) and ``ids`` (n int64).
k-means and PCA see the data only through the ``FeatureSource`` contract below: one rank
or many, cached in memory or streamed from disk, is a choice of the source, not of the
algorithm.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import h5py
import numpy as np

from deepercluster.errors import ClustersError, ShardError

log = logging.getLogger(__name__)

Chunk = tuple[np.ndarray, np.ndarray]  # (ids: int64 [n], x: float32 [n, dim])


class FeatureSource(Protocol):
    """The rows this rank clusters, read chunk by chunk."""

    dim: int
    count: int

    def chunks(self) -> Iterator[Chunk]: ...


def shard_count(images: int, shard_size: int) -> int:
    """Number of shards of ``shard_size`` images (the last one may be smaller)."""
    return max(1, -(-images // shard_size))


def require_rows(k: int, rows: int, key: str) -> None:
    """k-means makes at most one cluster per image: ``k`` above ``rows`` is an error naming the config ``key``."""
    if k > rows:
        raise ClustersError(f"{key} is {k}, more than the {rows} images: set it to at most {rows}, or add images")


def open_shard(path: str | os.PathLike) -> h5py.File:
    """Open a shard for reading; a truncated or foreign file gets one message naming it and the fix."""
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as error:
        raise ShardError(
            f"feature shard {path} is unreadable ({error}): it is missing or truncated; "
            "delete it and rerun snakemake, which re-extracts only that shard"
        ) from error
    if "features" not in f or "ids" not in f or f["features"].shape[0] != f["ids"].shape[0]:
        f.close()
        raise ShardError(
            f"feature shard {path} lacks matching 'features' and 'ids' datasets: "
            "delete it and rerun snakemake, which re-extracts only that shard"
        )
    return f


def shard_rows(path: str | os.PathLike) -> int:
    with open_shard(path) as f:
        return int(f["ids"].shape[0])


def read_ids(path: str | os.PathLike) -> np.ndarray:
    with open_shard(path) as f:
        return f["ids"][:].astype(np.int64)


def read_chunks(paths: Sequence[str], chunk_rows: int = 16384) -> Iterator[Chunk]:
    """Stream (ids, raw features) from ``paths`` in order, ``chunk_rows`` rows at a time."""
    for path in paths:
        with open_shard(path) as f:
            n = f["ids"].shape[0]
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                yield f["ids"][start:stop].astype(np.int64), f["features"][start:stop].astype(np.float32)


class ShardSource:
    """A ``FeatureSource`` over HDF5 shards, transformed (e.g. PCA-whitened) and optionally filtered by id.

    Rows are cached in memory when they fit in ``cache_mb``; otherwise every pass streams
    from disk, so memory stays bounded by one chunk whatever the number of images.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable[[np.ndarray], np.ndarray],
        dim: int,
        keep_ids: np.ndarray | None = None,
        cache_mb: float = 4096,
        chunk_rows: int = 16384,
    ) -> None:
        self.paths, self.transform, self.dim = list(paths), transform, dim
        self.keep_ids = None if keep_ids is None else np.sort(np.asarray(keep_ids, dtype=np.int64))
        self.chunk_rows = chunk_rows
        self._cache: list[Chunk] | None = None
        self.count = sum(int(np.count_nonzero(self._keep_mask(read_ids(p)))) for p in self.paths)
        if self.count * dim * 4 <= cache_mb * 2**20:
            self._cache = list(self._stream())
        else:
            log.info("%d rows exceed the %.0f MB cache: streaming them from disk each pass", self.count, cache_mb)

    def _keep_mask(self, ids: np.ndarray) -> np.ndarray:
        return np.ones(len(ids), bool) if self.keep_ids is None else np.isin(ids, self.keep_ids, assume_unique=True)

    def _stream(self) -> Iterator[Chunk]:
        for ids, x in read_chunks(self.paths, self.chunk_rows):
            keep = self._keep_mask(ids)
            if keep.any():
                yield ids[keep], self.transform(x[keep])

    def chunks(self) -> Iterator[Chunk]:
        return iter(self._cache) if self._cache is not None else self._stream()
