"""Feature shards as k-means sees them: the ``FeatureSource`` contract and its source over shard files.

One rank or many, cached in memory or streamed from disk, is a choice of the source, not
of the algorithm. The shard files themselves are read and written by ``formats.features``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from deepercluster.errors import ClustersError
from deepercluster.formats.features import Chunk, read_chunks, read_ids, read_rows
from deepercluster.formats.whitened import read_spill, spill_matches, spill_writer
from deepercluster.ids import in_sorted

log = logging.getLogger(__name__)


class FeatureSource(Protocol):
    """The rows this rank clusters, read chunk by chunk; their ids, in the chunks' order, held in memory."""

    dim: int
    count: int
    ids: np.ndarray

    def chunks(self) -> Iterator[Chunk]: ...


def require_rows(k: int, rows: int, key: str) -> None:
    """k-means makes at most one cluster per image: ``k`` above ``rows`` is an error naming the config ``key``."""
    if k > rows:
        raise ClustersError(f"{key} is {k}, more than the {rows} images: set it to at most {rows}, or add images")


class ShardSource:
    """A ``FeatureSource`` over HDF5 shards (all their rows, or those of ``keep_ids``), transformed (PCA-whitened)
    once: the rows are read from the shards and whitened in one pass, then kept as ``dtype``.

    In memory when they fit in ``cache_mb``; otherwise in the whitened spill ``spill`` (``formats.whitened``),
    written once, which every pass reads back, so memory stays bounded by one chunk whatever the number of
    images and no pass recomputes the whitening. With ``keep_ids`` only those rows are read from the shards
    (their positions found from the shards' ids), so a sub-cluster job reads its super-cluster's rows alone.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable[[np.ndarray], np.ndarray],
        dim: int,
        keep_ids: np.ndarray | None = None,
        cache_mb: float = 4096,
        chunk_rows: int = 16384,
        dtype: str = "float16",
        spill: str | None = None,
        **provenance: object,
    ) -> None:
        self.paths, self.transform, self.dim, self.chunk_rows = list(paths), transform, dim, chunk_rows
        self.positions, self.ids, sizes = kept_rows(self.paths, keep_ids, chunk_rows)
        self.bounds = np.cumsum([0, *sizes])  # the chunks: each shard's blocks, on any number of ranks
        self.count, self.spill = len(self.ids), None
        self._cache: np.ndarray | None = None
        if self.count * dim * np.dtype(dtype).itemsize <= cache_mb * 2**20:
            self._cache = cache = np.empty((self.count, dim), dtype)

            def fill(start: int, x: np.ndarray) -> None:
                cache[start : start + len(x)] = x

            self._whiten(fill, dtype)
            return
        if spill is None:
            raise ValueError(f"{self.count} rows exceed the {cache_mb:g} MB cache and no spill path was given")
        self.spill, attrs = spill, {"shards": self.paths, "dtype": dtype, **provenance}
        if spill_matches(spill, self.ids, dim, **attrs):
            log.info("reusing the whitened spill %s of %d rows", spill, self.count)
            return
        log.info("%d rows exceed the %.0f MB cache: whitening them once into %s", self.count, cache_mb, spill)
        with spill_writer(spill, self.ids, dim, **attrs) as write:
            self._whiten(write, dtype)

    def _whiten(self, write: Callable[[int, np.ndarray], None], dtype: str) -> None:
        """Read every kept row from the shards once, whiten it and ``write`` it (first row, rows) as ``dtype``."""
        start = 0
        for path, positions in zip(self.paths, self.positions, strict=True):
            raw = (
                (x for _, x in read_chunks([path], self.chunk_rows))
                if positions is None
                else (read_rows(path, positions, self.chunk_rows))
            )
            for x in raw:
                write(start, self.transform(x).astype(dtype, copy=False))
                start += len(x)

    def chunks(self) -> Iterator[Chunk]:
        """(ids, whitened rows) of each shard's ``chunk_rows``-row block, from the cache or the spill: the same
        chunks either way, and on any number of ranks."""
        bounds = list(zip(self.bounds[:-1], self.bounds[1:], strict=True))
        rows = (self._cache[a:b] for a, b in bounds) if self._cache is not None else read_spill(self.spill, bounds)
        return zip((self.ids[a:b] for a, b in bounds), rows, strict=True)

    def discard(self) -> None:
        """Remove the spill, once the level's result is written."""
        if self.spill is not None:
            os.unlink(self.spill)


def kept_rows(
    paths: Sequence[str], keep_ids: np.ndarray | None, chunk_rows: int
) -> tuple[list[np.ndarray | None], np.ndarray, np.ndarray]:
    """(per shard the positions of its rows in ``keep_ids``, None for all; the ids of those rows, in order; the
    number of them in each ``chunk_rows``-row block of each shard), from the shards' ids alone."""
    keep = None if keep_ids is None else np.sort(np.asarray(keep_ids, np.int64))
    positions, ids, sizes = [], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for path in paths:
        shard_ids = read_ids(path)
        held = None if keep is None else np.flatnonzero(in_sorted(shard_ids, keep))
        block = np.arange(len(shard_ids)) if held is None else held
        positions.append(held)
        ids.append(shard_ids if held is None else shard_ids[held])
        sizes.append(np.unique(block // chunk_rows, return_counts=True)[1])
    return positions, np.concatenate(ids), np.concatenate(sizes)
