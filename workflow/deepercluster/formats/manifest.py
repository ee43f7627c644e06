"""``manifest.parquet``: one row per image, ``id`` (0..N-1), ``path``, then metadata columns (e.g. ``label``)."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow.parquet as pq

from deepercluster.errors import DataError
from deepercluster.files import atomic_output


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


def manifest_size(manifest: str) -> int:
    """The number of images of a manifest, read from its parquet footer alone (the rules plan shards with it)."""
    try:
        return pq.ParquetFile(manifest).metadata.num_rows
    except (OSError, ValueError) as error:
        raise DataError(f"{manifest} is not a readable parquet file ({error}); delete it and rerun") from error


def metadata_columns(frame: pd.DataFrame) -> list[str]:
    """Every column of a manifest but id and path."""
    return [c for c in frame.columns if c not in ("id", "path")]
