"""The files between the stages, each written and read here only, so their dataset and attribute names live in
one place; free of torch and faiss, so the light stages (labels, eval-nmi) import none of them.

- ``manifest.parquet``: ``id`` (0..N-1), ``path``, then metadata columns.
- a feature shard ``shard-{i}.h5``: ``features`` (n x d float32), ``ids`` (n int64), provenance attributes.
- ``pca.h5``: a ``Whitening``: ``mean``, ``projection``, ``eigenvalues`` (float32), fit attributes.
- a clusters file (``super.h5``, ``sub-{s}.h5``): ``centroids`` and a ``Clusters``, ``ids`` and ``assignments``
  sorted by id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd

from deepercluster.errors import ClustersError, DataError, ShardError
from deepercluster.files import atomic_output

Chunk = tuple[np.ndarray, np.ndarray]  # (ids: int64 [n], x: float32 [n, dim])


def write_manifest(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_output(path) as partial:
        frame.to_parquet(partial, index=False)


def read_manifest(manifest: str) -> pd.DataFrame:
    """The manifest table: id, path, then metadata columns."""
    if not os.path.exists(manifest):
        raise DataError(f"{manifest} does not exist; run the workflow's 'manifest' stage to build it")
    try:
        frame = pd.read_parquet(manifest)
    except (OSError, ValueError) as error:
        raise DataError(f"{manifest} is not a readable parquet file ({error}); delete it and rerun") from error
    if not {"id", "path"} <= set(frame.columns):
        raise DataError(f"{manifest} has no 'id' and 'path' columns, so it is not a manifest; delete it and rerun")
    return frame


def metadata_columns(frame: pd.DataFrame) -> list[str]:
    """Every column of a manifest but id and path."""
    return [c for c in frame.columns if c not in ("id", "path")]


def write_shard(path: str | os.PathLike, features: np.ndarray, ids: np.ndarray, **attrs: object) -> None:
    """A feature shard: ``features`` (n x d float32), ``ids`` (n int64), ``attrs`` (``checkpoint_sha256``...)."""
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        f["features"] = np.asarray(features, np.float32)
        f["ids"] = np.asarray(ids, np.int64)
        f.attrs.update(attrs)


def open_shard(path: str | os.PathLike) -> h5py.File:
    """Open a shard for reading; a truncated or foreign file gets one message naming it and the fix.

    Without HDF5's 64 KiB sieve buffer, reading scattered rows (the PCA sample) reads those rows only.
    """
    access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    access.set_sieve_buf_size(0)
    access.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    try:
        f = h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY, fapl=access))
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


def shard_checkpoint(path: str | os.PathLike) -> str:
    """The sha256 of the checkpoint whose features a shard holds."""
    with open_shard(path) as f:
        return str(f.attrs["checkpoint_sha256"])


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
                ids, x = f["ids"][start:stop], f["features"][start:stop]
                yield ids.astype(np.int64, copy=False), x.astype(np.float32, copy=False)


def read_rows(path: str | os.PathLike, positions: np.ndarray, chunk_rows: int = 16384) -> Iterator[np.ndarray]:
    """The raw features of rows ``positions`` (sorted, unique) of a shard, reading no other row.

    One array per ``chunk_rows``-row block of the shard holding any of them, so memory is
    bounded by a block whatever the number of positions.
    """
    positions = np.asarray(positions, np.int64)
    blocks = positions // chunk_rows
    with open_shard(path) as f:
        for block in np.unique(blocks):
            yield f["features"][positions[blocks == block]].astype(np.float32, copy=False)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` L2-normalised (a zero row stays zero), in ``x``'s dtype."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
        return unit_rows(self.whiten(x))

    @classmethod
    def load(cls, path: str) -> Whitening:
        with h5py.File(path, "r") as f:
            return cls(f["mean"][:], f["projection"][:], f["eigenvalues"][:])

    def save(self, path: str, **attrs: object) -> None:
        """``pca.h5``: the three arrays as float32, and ``attrs`` (``checkpoint_sha256``, ``sample_size``...)."""
        with atomic_output(path) as partial, h5py.File(partial, "w") as f:
            f["mean"] = self.mean.astype(np.float32)
            f["projection"] = self.projection.astype(np.float32)
            f["eigenvalues"] = self.eigenvalues.astype(np.float32)
            f.attrs.update(attrs)


@dataclass
class Clusters:
    """A clusters file: a k-means result over every rank's rows, but its centroids (written, never read back)."""

    ids: np.ndarray  # [n] int64
    assignments: np.ndarray  # [n] int64: cluster of each of those rows
    sizes: np.ndarray  # [k] int64, empty clusters included (0)
    objective: np.ndarray  # [passes]: sum of squared distances at each assignment pass
    reseeded: np.ndarray  # [passes]: empty clusters re-seeded after each pass
    attrs: dict[str, object]  # level, seed, ... (super_cluster for level 2); read back with k


CLUSTERS_DATASETS = ("ids", "assignments", "sizes", "objective", "reseeded")


def write_clusters(path: str, clusters: Clusters, centroids: np.ndarray) -> None:
    """A clusters file: ``centroids`` ([k, d] float32), ``clusters`` with ``ids`` and ``assignments`` sorted by id,
    and its attributes with ``k``."""
    order = np.argsort(clusters.ids)
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        f["centroids"] = centroids
        f["ids"] = clusters.ids[order]
        f["assignments"] = clusters.assignments[order]
        f["objective"] = clusters.objective
        f["reseeded"] = clusters.reseeded
        f["sizes"] = clusters.sizes
        f.attrs.update(k=len(centroids), **clusters.attrs)


def read_clusters(path: str) -> Clusters:
    """A clusters file in one read; a missing, truncated or foreign one gets one message and the fix."""
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise ClustersError(f"clusters file {path} is unreadable ({error}): delete it and rerun its stage") from error
    with f:
        missing = [name for name in CLUSTERS_DATASETS if name not in f]
        if missing:
            names = ", ".join(missing)
            raise ClustersError(f"{path} lacks the datasets {names}, so it is no clusters file: delete it and rerun")
        return Clusters(**{name: f[name][:] for name in CLUSTERS_DATASETS}, attrs=dict(f.attrs))
