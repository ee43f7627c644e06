"""Feature shards as k-means sees them: the ``FeatureSource`` contract and its source over shard files.

One rank or many, cached in memory or streamed from disk, is a choice of the source, not
of the algorithm. The shard files themselves are read and written by ``formats.features``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from deepercluster.errors import ClustersError
from deepercluster.formats.features import Chunk, read_chunks, read_ids

log = logging.getLogger(__name__)


class FeatureSource(Protocol):
    """The rows this rank clusters, read chunk by chunk."""

    dim: int
    count: int

    def chunks(self) -> Iterator[Chunk]: ...


def require_rows(k: int, rows: int, key: str) -> None:
    """k-means makes at most one cluster per image: ``k`` above ``rows`` is an error naming the config ``key``."""
    if k > rows:
        raise ClustersError(f"{key} is {k}, more than the {rows} images: set it to at most {rows}, or add images")


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
