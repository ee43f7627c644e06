"""A round's pseudo-labels and what describes them:

- ``labels.parquet``: ``id``, ``super_cluster``, ``sub_cluster`` (its index inside its super-cluster), one row
  per image; its parquet metadata ``deepercluster`` holds ``sub_clusters``, the k of each super-cluster (so m
  and every k are known even when a trailing cluster is empty).
- ``cluster_sizes.tsv``: ``super_cluster``, ``sub_cluster``, ``size``, one row per cluster, empty ones included.
- a round's ``nmi.json``: ``{column: NMI}`` of the pseudo-labels with each metadata column, and ``previous_round``
  (null in round 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deepercluster.errors import ClustersError
from deepercluster.files import atomic_output
from deepercluster.formats.manifest import ROW_GROUP

METADATA_KEY = b"deepercluster"
COLUMNS = ("id", "super_cluster", "sub_cluster")


@dataclass
class Labels:
    """The pseudo-labels of a round: ``table`` (id, super_cluster, sub_cluster) and the k of each super-cluster."""

    table: pd.DataFrame
    sub_clusters: list[int]

    def flat(self) -> pd.Series:
        """One cluster id per image, indexed by id: (super_cluster, sub_cluster) as a single integer."""
        indexed = self.table.set_index("id")
        return indexed["super_cluster"] * max(self.sub_clusters) + indexed["sub_cluster"]


def write_labels(path: str | os.PathLike, labels: Labels) -> None:
    """``labels.parquet``, in row groups of ``ROW_GROUP`` rows (a super-cluster's rows are read a group at a time)."""
    table = pa.Table.from_pandas(labels.table[list(COLUMNS)], preserve_index=False)
    metadata = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps({"sub_clusters": labels.sub_clusters})}
    with atomic_output(path) as partial:
        pq.write_table(table.replace_schema_metadata(metadata), partial, row_group_size=ROW_GROUP)


def labels_file(path: str | os.PathLike) -> tuple[pq.ParquetFile, list[int]]:
    """A labels file, opened (its footer read), and its k per super-cluster."""
    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise ClustersError(f"{path} is not a readable labels file ({error}): delete it and rerun its stage") from error
    metadata = (file.schema_arrow.metadata or {}).get(METADATA_KEY)
    if metadata is None or not set(COLUMNS) <= set(file.schema_arrow.names):
        raise ClustersError(
            f"{path} lacks the columns {', '.join(COLUMNS)} or its k per super-cluster (written by an older "
            "version?): delete it and rerun its stage"
        )
    return file, json.loads(metadata)["sub_clusters"]


def read_labels(path: str | os.PathLike, super_cluster: int | None = None) -> Labels:
    """A labels table and its k per super-cluster, checked against each other; only super-cluster
    ``super_cluster``'s rows when given (the rows of every other are dropped a row group at a time)."""
    _, sub_clusters = labels_file(path)
    wanted = None if super_cluster is None else [("super_cluster", "==", super_cluster)]
    try:
        table = pq.read_table(path, columns=list(COLUMNS), filters=wanted)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise ClustersError(f"{path} is not a readable labels file ({error}): delete it and rerun its stage") from error
    labels = Labels(table.to_pandas()[list(COLUMNS)], sub_clusters)
    k = np.asarray(labels.sub_clusters)
    s, j = (labels.table[column].to_numpy() for column in ("super_cluster", "sub_cluster"))
    if not ((s >= 0) & (s < len(k)) & (j >= 0) & (j < k[np.clip(s, 0, len(k) - 1)])).all():
        raise ClustersError(
            f"{path} labels images outside its {len(k)} super-clusters of k = {k.tolist()}: "
            "delete it and rerun its stage"
        )
    return labels


def write_sizes(path: str | os.PathLike, sizes: pd.DataFrame) -> None:
    """``cluster_sizes.tsv`` from a frame of super_cluster, sub_cluster, size."""
    with atomic_output(path) as partial:
        sizes[["super_cluster", "sub_cluster", "size"]].to_csv(partial, sep="\t", index=False)


def read_sizes(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def write_round_nmi(path: str | os.PathLike, scores: dict[str, float | None]) -> None:
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(scores, indent=2) + "\n")


def read_round_nmi(path: str | os.PathLike) -> dict[str, float | None]:
    with open(path) as f:
        return json.load(f)
