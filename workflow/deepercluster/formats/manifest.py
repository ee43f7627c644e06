"""``manifest.parquet``: one row per image, ``id`` (0..N-1), ``path``, then metadata columns (e.g. ``label``); and
``skipped.tsv`` beside it, the images left out as unreadable. An image in a tar shard has ``path`` its tar, ``key``
its name there and the columns ``data.tars.LOCATION`` (where its bytes are, and the tar's size and mtime when indexed).

Both are written a row group (``ROW_GROUP`` rows) at a time, so building a manifest of any N holds one group.

An image under the working directory is stored by its path relative to it, any other by its absolute path, so a
run folder holding its images (the demo's) can be moved or copied elsewhere; ``read_manifest`` gives them back
absolute, resolved against the working directory of the stage reading it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deepercluster.errors import DataError
from deepercluster.files import atomic_output
from deepercluster.ids import in_sorted

log = logging.getLogger(__name__)


# The columns that say where an image's bytes are in its tar shard (a manifest with them reads its images from
# tars): the offset and size of its bytes, and its tar's size and mtime (float seconds, as os.stat gives it) when
# indexed (a tar changed since is refused). Null for an image file in a manifest that joins both (the evaluation
# images'), where they read back as float64: exact for any offset below 2^53 and for the mtime as indexed.
LOCATION = ("offset", "size", "tar_size", "tar_mtime")
# The columns that name an image and where its bytes are, not what it shows: its id and path, its key and location
# in a tar, a curated subset's pool_id (its image's id in the pool). No NMI is taken with them, no caption shows them.
IMAGE = ("id", "path", "key", *LOCATION, "pool_id")
# Paths as an int32 code an image into distinct paths (``read_manifest_ids``' and ``ImageDataset``'s): a tar's images
# cost 4 bytes each, not their path's length.
CODED_PATHS = pa.dictionary(pa.int32(), pa.large_string())
# Rows per parquet row group: a features job reads the row groups holding its shard's rows, not the whole manifest.
ROW_GROUP = 65_536


def write_manifest(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    """The manifest ``frame`` (every row at once)."""
    with manifest_writer(path, pa.Schema.from_pandas(frame, preserve_index=False)) as write:
        write(frame)


class ManifestRows:
    """Appends rows to a manifest being written, a row group of ``ROW_GROUP`` rows at a time."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer, self.pending, self.count, self.cwd = writer, [], 0, os.getcwd()

    def __call__(self, frame: pd.DataFrame) -> None:
        """Append ``frame``'s rows (columns of the schema missing from it are null)."""
        frame = frame.assign(path=[stored_path(p, self.cwd) for p in frame["path"]])
        table = pa.Table.from_pandas(frame, preserve_index=False)
        columns = [
            table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in self.writer.schema
        ]
        self.pending.append(pa.Table.from_arrays(columns, schema=self.writer.schema))
        self.count += len(frame)
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write the pending rows' whole row groups (all of them when ``final``)."""
        pending = pa.concat_tables(self.pending) if self.pending else None
        whole = 0 if pending is None else len(pending) if final else len(pending) // ROW_GROUP * ROW_GROUP
        if whole:
            self.writer.write_table(pending.slice(0, whole), row_group_size=ROW_GROUP)
        self.pending = [pending.slice(whole)] if pending is not None and whole < len(pending) else []


@contextlib.contextmanager
def manifest_writer(path: str | os.PathLike, schema: pa.Schema) -> Iterator[ManifestRows]:
    """A manifest with ``schema`` written atomically: ``ManifestRows`` to append to; renamed onto ``path`` when the
    block ends without an exception."""
    with atomic_output(path) as partial, pq.ParquetWriter(partial, schema) as writer:
        rows = ManifestRows(writer)
        yield rows
        rows.flush(final=True)


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
        table = file.read_row_groups(groups.tolist()).slice(start - first, max(0, stop - start))
    except (OSError, ValueError) as error:
        raise unreadable(manifest, error) from error
    paths = pa.chunked_array([absolute_paths(part).dictionary_decode() for part in table.column("path").chunks])
    return table.set_column(table.column_names.index("path"), "path", paths).to_pandas()


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
    """The id and path (and for an image in a tar, its ``LOCATION``) of the images ``ids``, in the manifest's order,
    read a row group at a time: memory is that of those rows and one group, whatever N (a training group's
    images). The paths are arrow dictionary arrays (pandas' ``ArrowDtype``), a row group's distinct paths once and
    an int32 code an image: a tar's images cost 4 bytes each, not their path's length."""
    wanted, parts, file = np.sort(np.asarray(ids, np.int64)), [], manifest_file(manifest)
    columns = [c for c in file.schema_arrow.names if c in ("id", "path", *LOCATION)]
    try:
        for batch in file.iter_batches(ROW_GROUP, columns=columns) if len(wanted) else []:
            rows = batch.filter(pa.array(in_sorted(batch.column("id").to_numpy(), wanted)))
            parts.append(rows.set_column(columns.index("path"), "path", absolute_paths(rows.column("path"))))
    except (OSError, ValueError) as error:
        raise unreadable(manifest, error) from error
    if not parts:
        return pd.DataFrame({"id": np.zeros(0, np.int64), "path": pd.Series([], dtype=pd.ArrowDtype(CODED_PATHS))})
    return pa.Table.from_batches(parts).to_pandas(types_mapper={CODED_PATHS: pd.ArrowDtype(CODED_PATHS)}.get)


def value_counts(manifest: str, column: str) -> pd.Series:
    """How many images hold each value of ``column`` (as text), read a row group of that column at a time: memory is
    the counts' and one group's, whatever N (a pool's class sizes)."""
    file, counts = manifest_file(manifest), pd.Series(dtype=np.int64)
    if column not in file.schema_arrow.names:
        raise DataError(f"{manifest} has no column '{column}'; name one of: {', '.join(file.schema_arrow.names)}")
    try:
        for batch in file.iter_batches(ROW_GROUP, columns=[column]):
            found = batch.column(0).to_pandas().dropna().astype(str).value_counts()
            counts = counts.add(found, fill_value=0).astype(np.int64)
    except (OSError, ValueError) as error:
        raise unreadable(manifest, error) from error
    return counts


def unreadable(manifest: str, error: Exception) -> DataError:
    """The error of a manifest that is not a readable parquet file."""
    return DataError(f"{manifest} is not a readable parquet file ({error}); delete it and rerun")


def absolute_paths(stored: pa.Array) -> pa.DictionaryArray:
    """Stored paths (relative to the working directory where they lie under it) absolute, dictionary-encoded: each
    distinct path made absolute once (a tar's images share theirs), the one Python string made for it."""
    encoded = stored.dictionary_encode()
    distinct = pa.array([os.path.abspath(p) for p in encoded.dictionary.to_pylist()], pa.large_string())
    return pa.DictionaryArray.from_arrays(encoded.indices, distinct)


def write_skipped(path: str | os.PathLike, errors: dict[str, str]) -> None:
    """``skipped.tsv`` (every row at once)."""
    with skipped_writer(path) as write:
        for image, error in errors.items():
            write(image, error)


@contextlib.contextmanager
def skipped_writer(path: str | os.PathLike) -> Iterator[Callable[[str, str], object]]:
    """``skipped.tsv`` written a row at a time, atomically: ``path`` and ``error`` of each image the manifest left
    out as unreadable; yields a function of (path, error)."""
    with atomic_output(path) as partial, open(partial, "w", newline="") as file:
        table = csv.writer(file, delimiter="\t", lineterminator="\n")
        table.writerow(["path", "error"])
        yield lambda image, error: table.writerow([image, error])


def manifest_size(manifest: str) -> int:
    """The number of images of a manifest, read from its parquet footer alone (the rules plan shards with it)."""
    return parquet_file(manifest).metadata.num_rows


def metadata_columns(frame: pd.DataFrame) -> list[str]:
    """Every column of a manifest but those that say which image a row is and where its bytes are (``IMAGE``)."""
    return [c for c in frame.columns if c not in IMAGE]


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
