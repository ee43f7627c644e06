"""``manifest.parquet``: one row per image, ``id`` (0..N-1), ``path``, then metadata columns (e.g. ``label``); and
``skipped.tsv`` beside it, the images left out as unreadable.

An image under the working directory is stored by its path relative to it, any other by its absolute path, so a
run folder holding its images (the demo's) can be moved or copied elsewhere; ``read_manifest`` gives them back
absolute, resolved against the working directory of the stage reading it.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deepercluster.errors import DataError
from deepercluster.files import atomic_output
from deepercluster.ids import in_sorted

log = logging.getLogger(__name__)


# Rows per parquet row group: a features job reads the row groups holding its shard's rows, not the whole manifest.
ROW_GROUP = 65_536


def write_manifest(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    cwd = os.getcwd()
    frame = frame.assign(path=[stored_path(p, cwd) for p in frame["path"]])
    with atomic_output(path) as partial:
        frame.to_parquet(partial, index=False, row_group_size=ROW_GROUP)


def stored_path(image: str, cwd: str) -> str:
    """``image`` relative to ``cwd`` when it lies under it, else absolute."""
    image = os.path.abspath(image)
    relative = os.path.relpath(image, cwd)
    return image if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def read_manifest(manifest: str, start: int = 0, stop: int | None = None) -> pd.DataFrame:
    """The manifest table: id, path (absolute), then metadata columns; its rows ``[start, stop)`` only (all by default),
    read from the parquet row groups that hold them alone, so memory is that of those rows whatever N."""
    file = manifest_file(manifest)
    sizes = np.array([file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)], np.int64)
    ends = np.cumsum(sizes)
    stop = int(sizes.sum()) if stop is None else min(stop, int(sizes.sum()))
    groups = np.flatnonzero((ends > start) & (ends - sizes < stop))
    first = int((ends - sizes)[groups[0]]) if len(groups) else start
    try:
        table = file.read_row_groups(groups.tolist())
    except (OSError, ValueError) as error:
        raise unreadable(manifest, error) from error
    return absolute(table.slice(start - first, max(0, stop - start)).to_pandas())


def parquet_file(manifest: str) -> pq.ParquetFile:
    """The manifest's parquet file, opened (its footer read), or one line naming it and the fix."""
    if not os.path.exists(manifest):
        raise DataError(f"{manifest} does not exist; run the workflow's 'manifest' stage to build it")
    try:
        file = pq.ParquetFile(manifest)
    except (OSError, ValueError) as error:
        raise unreadable(manifest, error) from error
    return file


def manifest_file(manifest: str) -> pq.ParquetFile:
    """``parquet_file``, checked to hold a manifest's id and path columns."""
    file = parquet_file(manifest)
    if not {"id", "path"} <= set(file.schema_arrow.names):
        raise DataError(f"{manifest} has no 'id' and 'path' columns, so it is not a manifest; delete it and rerun")
    return file


def read_manifest_ids(manifest: str, ids: np.ndarray) -> pd.DataFrame:
    """The id and path of the images ``ids``, in the manifest's order, read a row group at a time: memory is that
    of those rows and one group, whatever N (a training group's images)."""
    wanted, parts = np.sort(np.asarray(ids, np.int64)), []
    try:
        for batch in manifest_file(manifest).iter_batches(ROW_GROUP, columns=["id", "path"]) if len(wanted) else []:
            found = batch.column("id").to_numpy()
            parts.append(batch.filter(pa.array(in_sorted(found, wanted))))
    except (OSError, ValueError) as error:
        raise unreadable(manifest, error) from error
    if not parts:
        return pd.DataFrame({"id": np.zeros(0, np.int64), "path": np.zeros(0, str)})
    return absolute(pa.Table.from_batches(parts).to_pandas())


def unreadable(manifest: str, error: Exception) -> DataError:
    """The error of a manifest that is not a readable parquet file."""
    return DataError(f"{manifest} is not a readable parquet file ({error}); delete it and rerun")


def absolute(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its stored paths (relative to the working directory where they lie under it) absolute."""
    return frame.assign(path=[os.path.abspath(p) for p in frame["path"]])


def write_skipped(path: str | os.PathLike, errors: dict[str, str]) -> None:
    """``skipped.tsv``: ``path`` and ``error`` of each image the manifest left out as unreadable."""
    with atomic_output(path) as partial:
        pd.DataFrame({"path": list(errors), "error": list(errors.values())}).to_csv(partial, sep="\t", index=False)


def manifest_size(manifest: str) -> int:
    """The number of images of a manifest, read from its parquet footer alone (the rules plan shards with it)."""
    return parquet_file(manifest).metadata.num_rows


def metadata_columns(frame: pd.DataFrame) -> list[str]:
    """Every column of a manifest but id and path."""
    return [c for c in frame.columns if c not in ("id", "path")]


def informative_columns(frame: pd.DataFrame) -> list[str]:
    """The metadata columns of ``frame``'s rows that take two values or more: an NMI with, or the dominant value of,
    a constant column (the training images' split) says nothing. The others are named in the log."""
    columns = metadata_columns(frame)
    kept = [c for c in columns if frame[c].nunique(dropna=True) > 1]
    if len(kept) < len(columns):
        log.info("left out the constant metadata columns %s", ", ".join(c for c in columns if c not in kept))
    return kept


def test_images(frame: pd.DataFrame) -> pd.DataFrame:
    """The test images of an evaluation manifest (all of a manifest without roles)."""
    return frame[frame["eval_split"] == "test"] if "eval_split" in frame.columns else frame
