"""A curated subset of the pool: images drawn balanced over a round's two-level clusters, as the hierarchical
sampling of Vo et al. (2024, facebookresearch/ssl-data-curation) does, duplicates kept once.

The budget is split equally over the super-clusters, then each one's share over its sub-clusters
(``balanced_shares``, the same at both levels); inside a sub-cluster the images are drawn at random or nearest its
centroid. Two images of a sub-cluster whose whitened, L2-normalised features have a cosine similarity above
``duplicate_similarity`` are one image, kept once (the one of smaller id). The features are read a super-cluster at
a time, whitened by the round's PCA as its sub-level k-means read them; what is held over the whole pool is five
numbers per image (id, its two clusters, distance, duplicate).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from deepercluster.cluster.levels import whitened_shards
from deepercluster.errors import ClustersError, ConfigError
from deepercluster.files import atomic_output, sha256
from deepercluster.formats.clusters import read_clusters
from deepercluster.formats.features import open_shard
from deepercluster.formats.labels import labels_file, read_labels
from deepercluster.formats.manifest import ROW_GROUP, manifest_file, manifest_size, manifest_writer, read_manifest
from deepercluster.ids import in_sorted

log = logging.getLogger(__name__)

# The columns a curated manifest adds to the pool's: the image's id in the pool, and its clusters there.
CURATED_COLUMNS = ("pool_id", "super_cluster", "sub_cluster")
# How the images of a sub-cluster are drawn: at random, or those nearest its centroid.
STRATEGIES = ("random", "nearest")
# What the subset is balanced over: the hierarchy (the curated subset), or nothing (a uniform random subset of the
# pool, duplicates and all: the control a curated subset is measured against).
BALANCES = ("hierarchy", "none")
# Similarities computed at once when looking for duplicates: rows x earlier rows of a sub-cluster.
SIMILARITY_BLOCK = 1 << 24


def balanced_shares(sizes: np.ndarray, budget: int) -> np.ndarray:
    """The images each cluster of ``sizes`` gives to a ``budget``: equal shares, a cluster smaller than its share
    giving all it has and the rest split equally over the others (water-filling, smallest cluster first; what an
    equal split leaves over goes to the largest)."""
    shares = np.zeros(len(sizes), np.int64)
    left = min(int(budget), int(np.sum(sizes)))
    for done, i in enumerate(np.argsort(sizes, kind="stable")):
        shares[i] = min(int(sizes[i]), left // (len(sizes) - done))
        left -= shares[i]
    return shares


def duplicates(x: np.ndarray, similarity: float) -> np.ndarray:
    """A mask of the rows of ``x`` (unit rows, sorted by id) with a cosine similarity above ``similarity`` to an
    earlier row: each is a duplicate of an image of smaller id."""
    found = np.zeros(len(x), bool)
    step = max(1, SIMILARITY_BLOCK // max(1, len(x)))
    for start in range(0, len(x), step):
        stop = min(start + step, len(x))
        scores = x[start:stop] @ x[:stop].T
        later = np.arange(stop)[None, :] >= np.arange(start, stop)[:, None]
        scores[later] = -np.inf  # each row against the earlier rows only
        found[start:stop] = (scores > similarity).any(axis=1)
    return found


def require_pool(manifest: str, labels: str, shards: list[str]) -> None:
    """Refuse clusters made of another manifest's images than the pool ``manifest``'s."""
    pool = sha256(manifest)
    for path in shards:
        with open_shard(path) as f:
            if f.attrs.get("manifest_sha256") != pool:
                raise ClustersError(
                    f"{path} holds the features of another manifest than {manifest}: curate the clusters of a round "
                    f"whose manifest is {manifest} (results/curated/round-{{r}} of its run), or delete that round's "
                    "features and clusters and rerun"
                )
    clustered, images = labels_file(labels)[0].metadata.num_rows, manifest_size(manifest)
    if clustered != images:
        raise ClustersError(
            f"{labels} clusters {clustered} images but {manifest} has {images}: curate clusters of {manifest}, or "
            "delete the round's clusters and labels and rerun"
        )


def super_cluster_pool(
    s: int, labels: str, sub_file: str, shards: list[str], pca: str, out: str, similarity: float, **whitened: object
) -> pd.DataFrame:
    """Super-cluster ``s``'s images: id, super_cluster, sub_cluster, distance (squared, to its sub-cluster's
    centroid) and duplicate, from its rows of the shards whitened as its sub-level k-means whitened them."""
    members = read_labels(labels, super_cluster=s).table.sort_values("id", ignore_index=True)
    level2 = read_clusters(sub_file, centroids=True)
    if int(level2.attrs.get("super_cluster", -1)) != s or not np.array_equal(level2.ids, members["id"]):
        raise ClustersError(f"{sub_file} is not the sub-clusters of super-cluster {s} of {labels}: delete it and rerun")
    source = whitened_shards(shards, pca, out=out, keep_ids=members["id"].to_numpy(), super_cluster=s, **whitened)
    order = np.argsort(source.ids, kind="stable")
    x = np.concatenate([rows for _, rows in source.chunks()]).astype(np.float32)[order]
    source.discard()
    if not np.array_equal(source.ids[order], members["id"]):
        raise ClustersError(f"the shards {', '.join(shards)} lack images of super-cluster {s} of {labels}: rerun them")
    sub_cluster = members["sub_cluster"].to_numpy()
    distance = np.sum((x - level2.centroids[sub_cluster]) ** 2, axis=1)
    duplicate = np.zeros(len(x), bool)
    for j in np.unique(sub_cluster):
        rows = np.flatnonzero(sub_cluster == j)
        duplicate[rows] = duplicates(x[rows], similarity)
    return members.assign(distance=distance, duplicate=duplicate)


def pick(rows: pd.DataFrame, n: int, strategy: str, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` of a sub-cluster's ``rows``: those nearest its centroid (ties: smaller id first), or ``n`` at random."""
    if strategy == "nearest":
        return rows.nsmallest(n, "distance", keep="first")
    return rows.iloc[np.sort(rng.choice(len(rows), n, replace=False))]


def draw(pool: pd.DataFrame, size: int, strategy: str, seed: int, balance: str = "hierarchy") -> pd.DataFrame:
    """``size`` of the pool's images that are no duplicate, balanced over super-clusters then sub-clusters, drawn
    inside each sub-cluster by ``strategy`` (random, nearest its centroid), sorted by id; with ``balance`` none,
    ``size`` of all the pool's images drawn uniformly at random."""
    rng = np.random.default_rng(seed)
    if balance == "none":
        return pool.iloc[np.sort(rng.choice(len(pool), size, replace=False))].sort_values("id", ignore_index=True)
    kept, drawn = pool[~pool["duplicate"]], []
    by_super = list(kept.groupby("super_cluster"))
    shares = balanced_shares(np.array([len(members) for _, members in by_super]), size)
    for (_, members), share in zip(by_super, shares, strict=True):
        by_sub = list(members.groupby("sub_cluster"))
        sub_shares = balanced_shares(np.array([len(rows) for _, rows in by_sub]), share)
        drawn += [pick(rows, n, strategy, rng) for (_, rows), n in zip(by_sub, sub_shares, strict=True)]
    return pd.concat(drawn).sort_values("id", ignore_index=True)


def write_curated(manifest: str, drawn: pd.DataFrame, out: str) -> None:
    """The pool's rows of the ``drawn`` images as a manifest of ids 0..n-1, with ``CURATED_COLUMNS``, written a
    row group of the pool at a time."""
    pool = manifest_file(manifest).schema_arrow.remove_metadata()
    fields = [f for f in pool if f.name not in CURATED_COLUMNS] + [pa.field(c, pa.int64()) for c in CURATED_COLUMNS]
    clusters = drawn.set_index("id")[["super_cluster", "sub_cluster"]]
    wanted, written = drawn["id"].to_numpy(), 0
    with manifest_writer(out, pa.schema(fields)) as write:
        for start in range(0, manifest_size(manifest), ROW_GROUP):
            rows = read_manifest(manifest, start, start + ROW_GROUP)
            rows = rows[in_sorted(rows["id"].to_numpy(), wanted)]
            chosen = clusters.loc[rows["id"]].to_numpy()
            ids = np.arange(written, written + len(rows))
            write(rows.assign(pool_id=rows["id"], id=ids, super_cluster=chosen[:, 0], sub_cluster=chosen[:, 1]))
            written += len(rows)


def write_sizes(path: str, pool: pd.DataFrame, drawn: pd.DataFrame) -> None:
    """``cluster_sizes.tsv`` of the subset: each sub-cluster's images in the pool, duplicates and curated."""
    keys = ["super_cluster", "sub_cluster"]
    sizes = pool.groupby(keys).agg(pool=("id", "size"), duplicates=("duplicate", "sum"))
    sizes["curated"] = drawn.groupby(keys).size().reindex(sizes.index, fill_value=0)
    with atomic_output(path) as partial:
        sizes.reset_index().to_csv(partial, sep="\t", index=False)


def log_duplicates(pool: pd.DataFrame, images: int, size: int, similarity: float, balance: str) -> None:
    """How many of the pool's ``images`` are duplicates (dropped before a balanced draw, kept in the control), and
    a warning where fewer than ``size`` images remain to draw from."""
    dropped = int(pool["duplicate"].sum())
    log.info(
        "%d of %d images are duplicates (cosine similarity above %g to an image of smaller id in their "
        "sub-cluster), %s",
        dropped,
        images,
        similarity,
        "dropped" if balance == "hierarchy" else "kept (curation.balance: none)",
    )
    if size > images - dropped and balance == "hierarchy":
        log.warning(
            "curation.size is %d but %d images remain once duplicates are dropped: the subset has %d",
            size,
            images - dropped,
            images - dropped,
        )


def curate(
    *,
    manifest: str,
    labels: str,
    sub_files: list[str],
    shards: list[str],
    pca: str,
    size: int,
    strategy: str,
    balance: str,
    duplicate_similarity: float,
    seed: int,
    cache_mb: float,
    dtype: str,
    out: str,
    sizes: str,
) -> None:
    """Stage 'curate': ``size`` images of the pool ``manifest`` drawn balanced over the clusters ``labels`` (of
    ``sub_files``, over the features ``shards`` whitened by ``pca``) -> the manifest ``out`` and ``sizes``; with
    ``balance`` none, a uniform random subset of the pool of that size instead (the control)."""
    if strategy not in STRATEGIES or balance not in BALANCES:
        raise ValueError(f"unknown curation strategy {strategy!r} or balance {balance!r}: {STRATEGIES}, {BALANCES}")
    images = manifest_size(manifest)
    if size > images:
        raise ConfigError(
            f"curation.size is {size}, more than the {images} images of {manifest}: set it to at most {images}"
        )
    require_pool(manifest, labels, shards)
    pool = pd.concat(
        [
            super_cluster_pool(s, labels, path, shards, pca, out, duplicate_similarity, cache_mb=cache_mb, dtype=dtype)
            for s, path in enumerate(sub_files)
        ],
        ignore_index=True,
    )
    log_duplicates(pool, images, size, duplicate_similarity, balance)
    drawn = draw(pool, size, strategy, seed, balance)
    write_curated(manifest, drawn, out)
    write_sizes(sizes, pool, drawn)
    log.info(
        "curated %d of %d images (%s) over %d super-clusters and %d sub-clusters",
        len(drawn),
        images,
        f"balanced over the hierarchy, {strategy}"
        if balance == "hierarchy"
        else "uniformly at random, duplicates kept",
        drawn["super_cluster"].nunique(),
        len(drawn.groupby(["super_cluster", "sub_cluster"])),
    )
