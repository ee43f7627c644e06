"""Pseudo-labels of a round: each image's super-cluster and sub-cluster, their sizes, and NMI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score

from deepercluster.errors import ClustersError
from deepercluster.files import atomic_output
from deepercluster.formats import metadata_columns, read_clusters, read_manifest

log = logging.getLogger(__name__)


def read_labels(path: str) -> pd.DataFrame:
    """A labels table: id, super_cluster, sub_cluster (index inside its super-cluster)."""
    return pd.read_parquet(path)


def cluster_of(labels: pd.DataFrame) -> pd.Series:
    """One flat cluster id per image: (super_cluster, sub_cluster) as a single integer."""
    width = int(labels["sub_cluster"].max()) + 1
    return labels["super_cluster"] * width + labels["sub_cluster"]


def nmi(a: pd.Series, b: pd.Series) -> float:
    """NMI between two labellings indexed by id, over the ids where both are present."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    return float(normalized_mutual_info_score(joined["a"].astype(str), joined["b"].astype(str)))


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
    level1 = read_clusters(super_file)
    ids, super_cluster = level1.ids, level1.assignments
    sub_cluster = np.full(len(ids), -1, np.int64)
    sizes_rows = []
    for s, path in enumerate(sub_files):
        level2 = read_clusters(path)
        if int(level2.attrs.get("super_cluster", -1)) != s:
            raise ClustersError(f"{path} is not the sub-clusters of super-cluster {s}: delete it and rerun")
        sizes_rows += [(s, j, int(size)) for j, size in enumerate(level2.sizes)]
        position = np.searchsorted(ids, level2.ids)
        if not (super_cluster[position] == s).all():
            raise ClustersError(f"{path} does not match {super_file}: delete it and rerun its sub_clusters stage")
        sub_cluster[position] = level2.assignments
    if len(ids) != len(images) or (sub_cluster < 0).any() or not np.array_equal(ids, images.index.to_numpy()):
        raise ClustersError(
            f"{super_file} and the sub-cluster files do not cover every image of {manifest} once: "
            "delete the round's features and clusters and rerun"
        )

    labels = pd.DataFrame({"id": ids, "super_cluster": super_cluster, "sub_cluster": sub_cluster})
    # Every cluster's size as k-means wrote it, empty clusters included (a groupby would leave them out).
    counts = pd.DataFrame(sizes_rows, columns=["super_cluster", "sub_cluster", "size"])
    written = counts.set_index(["super_cluster", "sub_cluster"])["size"]
    assigned = labels.groupby(["super_cluster", "sub_cluster"]).size().reindex(written.index, fill_value=0)
    if not np.array_equal(assigned.to_numpy(), written.to_numpy()) or assigned.sum() != len(labels):
        raise ClustersError(
            f"the sizes in {', '.join(sub_files)} do not match their assignments: delete them and rerun sub_clusters"
        )
    flat = cluster_of(labels.set_index("id"))
    scores = {column: nmi(flat, images[column]) for column in metadata_columns(images.reset_index())}
    scores["previous_round"] = nmi(flat, cluster_of(read_labels(previous).set_index("id"))) if previous else None
    log.info(
        "%d images in %d clusters (%d super-clusters, %d empty clusters); NMI %s",
        len(labels),
        len(counts),
        labels["super_cluster"].nunique(),
        int((counts["size"] == 0).sum()),
        json.dumps(scores),
    )

    with atomic_output(out) as partial:
        labels.to_parquet(partial, index=False)
    with atomic_output(sizes) as partial:
        counts.to_csv(partial, sep="\t", index=False)
    with atomic_output(nmi_out) as partial:
        partial.write_text(json.dumps(scores, indent=2) + "\n")
