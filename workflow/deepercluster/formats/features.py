"""Feature files: a round's shards ``features/shard-{i}.h5`` and an evaluation's ``features.h5`` (the penultimate
feature, "the feature" the clustering sees), and an evaluation's ``probe_features.h5`` (pooled conv activations).

A shard (or ``features.h5``): ``features`` (n x d float32, or float16: ``features.dtype``; read back as float32),
``ids`` (n int64), provenance attributes (``checkpoint_sha256``, ``layer``, ``transform``, ``manifest_sha256``...).

``probe_features.h5``: ``ids`` (n int64) and, per pooling of ``POOLINGS`` and conv layer, a float16 dataset
``{pooling}/{layer}`` (n x that pooling's dim); attributes ``layers`` (the conv layers' names, in order),
``pools`` (each one's side in the papers' pooling), ``checkpoint_sha256``, ``arch``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import h5py
import numpy as np

from deepercluster.errors import ShardError
from deepercluster.files import atomic_output

Chunk = tuple[np.ndarray, np.ndarray]  # (ids: int64 [n], x: float32 [n, dim])
POOLINGS = {
    "channels": "each channel averaged over the whole map (its number of channels)",
    "pooled": "averaged over s x s cells, channels x s x s below 10,000 (the papers' probes)",
}


def write_shard(
    path: str | os.PathLike, features: np.ndarray, ids: np.ndarray, dtype: str = "float32", **attrs: object
) -> None:
    """A feature shard: ``features`` (n x d, stored as ``dtype``: float32 or float16), ``ids`` (n int64), ``attrs``
    (``checkpoint_sha256``...).

    HDF5 allocates the features' contiguous bytes (never filled) and numpy writes them in place: HDF5's own
    write of a large array ran at 0.65-0.8 of ``np.save``'s speed here, numpy's at about 0.95.
    """
    features = np.ascontiguousarray(features, dtype)
    with atomic_output(path) as partial:
        with h5py.File(partial, "w") as f:
            offset = allocated_dataset(f, "features", features)
            f["ids"] = np.asarray(ids, np.int64)
            f.attrs.update(attrs)
        if features.size:
            with open(partial, "r+b") as raw:
                raw.seek(offset)
                features.tofile(raw)


def allocated_dataset(f: h5py.File, name: str, like: np.ndarray) -> int:
    """A contiguous dataset ``name`` of ``like``'s shape and type, allocated now and left unwritten: its offset in
    the file."""
    layout = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    layout.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    layout.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    layout.set_obj_track_times(False)  # no creation time in the header: identical runs, identical bytes
    space = h5py.h5s.create_simple(like.shape)
    dataset = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(like.dtype), space, dcpl=layout)
    return dataset.get_offset()


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


def shard_dim(path: str | os.PathLike) -> int:
    """The feature dimension of a shard's rows."""
    with open_shard(path) as f:
        return int(f["features"].shape[1])


def shard_checkpoint(path: str | os.PathLike) -> str:
    """The sha256 of the checkpoint whose features a shard holds."""
    with open_shard(path) as f:
        return str(f.attrs["checkpoint_sha256"])


def require_checkpoint(paths: Sequence[str], checkpoint_sha256: str, checkpoint: str) -> None:
    """Refuse the shards whose features are not those of ``checkpoint`` (of sha256 ``checkpoint_sha256``), the one
    their round (or evaluation) extracts with: another round's or another run's, copied over them."""
    for path in paths:
        found = shard_checkpoint(path)
        if found != checkpoint_sha256:
            raise ShardError(
                f"feature shard {path} holds the features of another checkpoint (sha256 {found[:12]}...) than "
                f"{checkpoint} (sha256 {checkpoint_sha256[:12]}...), which its round extracts them with: delete "
                f"the shards of {os.path.dirname(path) or '.'} that are not of it and rerun snakemake, which "
                "re-extracts them"
            )


def finite_features(path: str | os.PathLike, f: h5py.File, x: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """``x``, the features of rows ``rows`` read from ``path`` (open as ``f``), refused with one line naming the
    checkpoint that made them when any is NaN or infinite. Every reader of features calls it."""
    if np.isfinite(x).all():
        return x
    bad = ~np.isfinite(x).all(axis=1)
    first = int(f["ids"][:][rows][bad][0])
    made_by = f.attrs.get("checkpoint", f"the checkpoint of sha256 {f.attrs.get('checkpoint_sha256')}")
    raise ShardError(
        f"features file {path} holds non-finite values ({int(bad.sum())} of the {len(x)} rows read, e.g. image id "
        f"{first}'s): {made_by} made them; that checkpoint's training diverged or overflows: lower the lr "
        "of the method that trained it (methods.<method>.lr) and rerun snakemake, which re-extracts them"
    )


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
                ids, x = f["ids"][start:stop], f["features"][start:stop].astype(np.float32, copy=False)
                yield ids.astype(np.int64, copy=False), finite_features(path, f, x, slice(start, stop))


def read_rows(path: str | os.PathLike, positions: np.ndarray, chunk_rows: int = 16384) -> Iterator[np.ndarray]:
    """The raw features of rows ``positions`` (sorted, unique) of a shard, reading no other row.

    One array per ``chunk_rows``-row block of the shard holding any of them, so memory is
    bounded by a block whatever the number of positions.
    """
    positions = np.asarray(positions, np.int64)
    blocks = positions // chunk_rows
    with open_shard(path) as f:
        for block in np.unique(blocks):
            rows = positions[blocks == block]
            yield finite_features(path, f, f["features"][rows].astype(np.float32, copy=False), rows)


@contextlib.contextmanager
def probe_features_writer(
    path: str | os.PathLike, ids: np.ndarray, layers: list[str], dims: dict[str, int], **attrs: object
) -> Iterator[Callable[[int, list[np.ndarray]], None]]:
    """``probe_features.h5`` for the images ``ids`` of the conv ``layers``, one dataset per item of ``dims``
    (``{pooling}/{layer}``: dim), written batch by batch: the function yielded takes (first row, [values of each
    dataset]). Renamed on success only."""
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        f["ids"] = np.asarray(ids, np.int64)
        datasets = [f.create_dataset(name, (len(ids), dim), np.float16) for name, dim in dims.items()]

        def write(start: int, values: list[np.ndarray]) -> None:
            for dataset, x in zip(datasets, values, strict=True):
                dataset[start : start + len(x)] = x

        yield write
        f.attrs.update(layers=layers, **attrs)


def probe_attributes(path: str | os.PathLike) -> dict[str, object]:
    """A ``probe_features.h5``'s attributes: ``layers`` (in order), ``pools``, ``checkpoint_sha256``, ``arch``."""
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


BLOCK_BYTES = 8 << 20  # small enough for malloc to reuse a block's memory (fresh pages are dear on some VMs)


def row_blocks(rows: np.ndarray, dim: int, itemsize: int) -> list[np.ndarray]:
    """``rows`` cut into consecutive blocks of at most ``BLOCK_BYTES`` of ``dim``-wide rows of ``itemsize`` bytes."""
    size = max(1, BLOCK_BYTES // (dim * itemsize))
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def read_probe_layer(path: str | os.PathLike, layer: str, ids: np.ndarray) -> np.ndarray:
    """One dataset's (``{pooling}/{layer}``) activations (float32) of the images ``ids`` of a ``probe_features.h5``,
    read a block of rows at a time into the one array it returns."""
    with h5py.File(path, "r") as f:
        stored = f[layer]
        position = np.searchsorted(f["ids"][:], ids)
        x = np.empty((len(ids), stored.shape[1]), np.float32)
        for wanted in row_blocks(np.argsort(position, kind="stable"), stored.shape[1], 4):
            rows = position[wanted]
            values = stored[rows[0] : rows[-1] + 1][rows - rows[0]].astype(np.float32)
            x[wanted] = finite_features(path, f, values, rows)
        return x
