"""Pseudo-labels of a round: each image's super-cluster and sub-cluster, their sizes, and NMI; and the true
classes as labels of the same form, for the supervised bound."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score

from deepercluster.errors import ClustersError
from deepercluster.formats.clusters import read_clusters
from deepercluster.formats.labels import Labels, read_labels, write_labels, write_round_nmi, write_sizes
from deepercluster.formats.manifest import informative_columns, metadata_columns, read_manifest

log = logging.getLogger(__name__)


def nmi(a: pd.Series, b: pd.Series) -> float:
    """NMI between two labellings indexed by id, over the ids where both are present."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    return float(normalized_mutual_info_score(joined["a"].astype(str), joined["b"].astype(str)))


def joined_levels(super_file: str, sub_files: list[str]) -> tuple[Labels, pd.DataFrame]:
    """The labels of both levels, and every cluster's size as k-means wrote it (empty clusters included)."""
    level1 = read_clusters(super_file)
    ids, super_cluster = level1.ids, level1.assignments
    sub_cluster = np.full(len(ids), -1, np.int64)
    sizes_rows, sub_clusters = [], []
    for s, path in enumerate(sub_files):
        level2 = read_clusters(path)
        if int(level2.attrs.get("super_cluster", -1)) != s:
            raise ClustersError(f"{path} is not the sub-clusters of super-cluster {s}: delete it and rerun")
        sizes_rows += [(s, j, int(size)) for j, size in enumerate(level2.sizes)]
        sub_clusters.append(len(level2.sizes))
        position = np.searchsorted(ids, level2.ids)
        if not (super_cluster[position] == s).all():
            raise ClustersError(f"{path} does not match {super_file}: delete it and rerun its sub_clusters stage")
        sub_cluster[position] = level2.assignments
    table = pd.DataFrame({"id": ids, "super_cluster": super_cluster, "sub_cluster": sub_cluster})
    return Labels(table, sub_clusters), pd.DataFrame(sizes_rows, columns=["super_cluster", "sub_cluster", "size"])


def make_labels(
    *,
    manifest: str,
    super_file: str,
    sub_files: list[str],
    out: str,
    sizes: str,
    nmi_out: str,
    previous: str | None = None,
) -> None:
    """Stage 'labels': join both levels into ``labels.parquet``; write ``cluster_sizes.tsv``, ``nmi.json``.

    NMI is computed between the flat clustering and every metadata column of the manifest,
    and against ``previous`` (the previous round's labels) when given.
    """
    images = read_manifest(manifest).set_index("id")
    labels, counts = joined_levels(super_file, sub_files)
    ids, sub_cluster = labels.table["id"].to_numpy(), labels.table["sub_cluster"].to_numpy()
    if len(ids) != len(images) or (sub_cluster < 0).any() or not np.array_equal(ids, images.index.to_numpy()):
        raise ClustersError(
            f"{super_file} and the sub-cluster files do not cover every image of {manifest} once: "
            "delete the round's features and clusters and rerun"
        )
    written = counts.set_index(["super_cluster", "sub_cluster"])["size"]
    assigned = labels.table.groupby(["super_cluster", "sub_cluster"]).size().reindex(written.index, fill_value=0)
    if not np.array_equal(assigned.to_numpy(), written.to_numpy()) or assigned.sum() != len(labels.table):
        raise ClustersError(
            f"the sizes in {', '.join(sub_files)} do not match their assignments: delete them and rerun sub_clusters"
        )
    flat = labels.flat()
    scores = {column: nmi(flat, images[column]) for column in informative_columns(images.reset_index())}
    scores["previous_round"] = nmi(flat, read_labels(previous).flat()) if previous else None
    log.info(
        "%d images in %d clusters (%d super-clusters, %d empty clusters); NMI %s",
        len(labels.table),
        len(counts),
        labels.table["super_cluster"].nunique(),
        int((counts["size"] == 0).sum()),
        json.dumps(scores),
    )
    write_labels(out, labels)
    write_sizes(sizes, counts)
    write_round_nmi(nmi_out, scores)


def true_labels(*, manifest: str, out: str, label_column: str) -> None:
    """Stage 'true-labels': each image's class in ``label_column`` as its label (one super-cluster, a sub-cluster
    per class, in sorted order): the supervised bound's, the only labels any training block reads."""
    images = read_manifest(manifest)
    if label_column not in images.columns or images[label_column].isna().any():
        raise ClustersError(
            f"{manifest}: the supervised bound needs a class in column {label_column!r} for every image; set "
            "methods.supervised.label_column to such a column (it has "
            f"{', '.join(metadata_columns(images)) or 'none'}), or leave the supervised row out of compare"
        )
    classes = pd.Categorical(images[label_column].astype(str))
    table = pd.DataFrame({"id": images["id"], "super_cluster": 0, "sub_cluster": classes.codes.astype(np.int64)})
    log.info(
        "%d images of %d classes (%s) as the supervised bound's labels",
        len(table),
        len(classes.categories),
        ", ".join(classes.categories),
    )
    write_labels(out, Labels(table, [len(classes.categories)]))
