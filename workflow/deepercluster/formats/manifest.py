"""``manifest.parquet``: one row per image, ``id`` (0..N-1), ``path``, then metadata columns (e.g. ``label``); and
``skipped.tsv`` beside it, the images left out as unreadable.

An image under the working directory is stored by its path relative to it, any other by its absolute path, so a
run folder holding its images (the demo's) can be moved or copied elsewhere; ``read_manifest`` gives them back
absolute, resolved against the working directory of the stage reading it.
"""

from __future__ import annotations

import logging
import os

import pandas as pd
import pyarrow.parquet as pq

from deepercluster.errors import DataError
from deepercluster.files import atomic_output

log = logging.getLogger(__name__)


def write_manifest(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    cwd = os.getcwd()
    frame = frame.assign(path=[stored_path(p, cwd) for p in frame["path"]])
    with atomic_output(path) as partial:
        frame.to_parquet(partial, index=False)


def stored_path(image: str, cwd: str) -> str:
    """``image`` relative to ``cwd`` when it lies under it, else absolute."""
    image = os.path.abspath(image)
    relative = os.path.relpath(image, cwd)
    return image if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def read_manifest(manifest: str) -> pd.DataFrame:
    """The manifest table: id, path (absolute), then metadata columns."""
    if not os.path.exists(manifest):
        raise DataError(f"{manifest} does not exist; run the workflow's 'manifest' stage to build it")
    try:
        frame = pd.read_parquet(manifest)
    except (OSError, ValueError) as error:
        raise DataError(f"{manifest} is not a readable parquet file ({error}); delete it and rerun") from error
    if not {"id", "path"} <= set(frame.columns):
        raise DataError(f"{manifest} has no 'id' and 'path' columns, so it is not a manifest; delete it and rerun")
    frame["path"] = [os.path.abspath(p) for p in frame["path"]]
    return frame


def write_skipped(path: str | os.PathLike, errors: dict[str, str]) -> None:
    """``skipped.tsv``: ``path`` and ``error`` of each image the manifest left out as unreadable."""
    with atomic_output(path) as partial:
        pd.DataFrame({"path": list(errors), "error": list(errors.values())}).to_csv(partial, sep="\t", index=False)


def manifest_size(manifest: str) -> int:
    """The number of images of a manifest, read from its parquet footer alone (the rules plan shards with it)."""
    try:
        return pq.ParquetFile(manifest).metadata.num_rows
    except (OSError, ValueError) as error:
        raise DataError(f"{manifest} is not a readable parquet file ({error}); delete it and rerun") from error


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
