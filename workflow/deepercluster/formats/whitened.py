"""A whitened spill ``{out}.rank{r}.whitened.h5``: one k-means rank's rows, PCA-whitened and L2-normalised once,
which every pass of that level reads back when they exceed ``kmeans.cache_mb`` (so no pass re-whitens).

``x`` (n x d, float16 by default, or float32) and ``ids`` (n int64), in the order the rank iterates over them;
attributes ``pca_sha256`` (the whitening it was made with), ``shards`` (the raw shards it was read from), ``dtype``
and, for a sub-cluster job, ``super_sha256``. Written atomically; a job rerun after a failure reuses a spill whose
attributes and ids match its own, and the level removes it once its clusters file is written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import h5py
import numpy as np

from deepercluster.files import atomic_output


@contextlib.contextmanager
def spill_writer(
    path: str | os.PathLike, ids: np.ndarray, dim: int, dtype: str, **attrs: object
) -> Iterator[Callable[[int, np.ndarray], None]]:
    """A spill for the rows ``ids``, written block by block: the function yielded takes (first row, rows)."""
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        f["ids"] = np.asarray(ids, np.int64)
        x = f.create_dataset("x", (len(ids), dim), dtype)

        def write(start: int, rows: np.ndarray) -> None:
            x[start : start + len(rows)] = rows

        yield write
        f.attrs.update(dtype=dtype, **attrs)


def spill_matches(path: str | os.PathLike, ids: np.ndarray, dim: int, **attrs: object) -> bool:
    """Whether ``path`` is a finished spill of exactly the rows ``ids`` (in order), ``dim`` wide, with ``attrs``."""
    if not os.path.exists(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            same = all(np.array_equal(f.attrs.get(key), value) for key, value in attrs.items())
            return same and f["x"].shape == (len(ids), dim) and np.array_equal(f["ids"][:], ids)
    except (OSError, KeyError):
        return False


def read_spill(path: str | os.PathLike, bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The spill's rows ``start:stop`` of each of ``bounds``, in its dtype (the ids stay with the caller: no pass
    reads them)."""
    with h5py.File(path, "r") as f:
        x = f["x"]
        for start, stop in bounds:
            yield x[start:stop]
