"""The two k-means levels of a round as stages: m super-clusters over all images, then k sub-clusters inside
each; and the evaluations' flat k-means over one checkpoint's features.

Every level runs the same ``kmeans`` over the PCA-whitened shards; ranks split the shards
(``shards[rank::world_size]``), rank 0 gathers the assignments and writes the clusters file
(``formats.clusters``).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from deepercluster.cluster.kmeans import kmeans
from deepercluster.cluster.rows import ShardSource, require_rows
from deepercluster.distributed import gather_objects, init_distributed
from deepercluster.errors import ClustersError
from deepercluster.files import sha256
from deepercluster.formats.clusters import Clusters, read_clusters, write_clusters
from deepercluster.formats.features import require_checkpoint, shard_rows
from deepercluster.formats.whitening import Whitening, whitening_checkpoint
from deepercluster.seeds import derived_seed

log = logging.getLogger(__name__)


def level_seed(seed: int, super_cluster: int | None) -> int:
    """The k-means seed of level 1 (``super_cluster`` None) or of one super-cluster's level 2."""
    return derived_seed(seed, 0 if super_cluster is None else 1 + super_cluster)


def whitened_shards(
    shards: list[str],
    pca: str,
    cache_mb: float,
    out: str | None = None,
    keep_ids: np.ndarray | None = None,
    *,
    dtype: str,
    **provenance: object,
) -> ShardSource:
    """This rank's share of the shards, PCA-whitened and L2-normalised once, kept as ``dtype``: in memory within
    ``cache_mb``, else spilled to ``{out}.rank{r}.whitened.h5`` with the pca file's sha256 and ``provenance``;
    each shard must hold the features of the checkpoint ``pca`` was fitted on."""
    context = init_distributed()
    whitening = Whitening.load(pca)
    mine = shards[context.rank :: context.world_size]
    require_checkpoint(mine, whitening_checkpoint(pca), f"the checkpoint {pca} was fitted on")
    spill = None if out is None else f"{out}.rank{context.rank}.whitened.h5"
    return ShardSource(
        mine,
        whitening,
        whitening.dim,
        keep_ids=keep_ids,
        cache_mb=cache_mb,
        dtype=dtype,
        spill=spill,
        pca_sha256=sha256(pca),
        **provenance,
    )


def write_result(out: str, result: Clusters, **attrs: object) -> None:
    """Gather every rank's assignments to rank 0, which writes the clusters file; the others send theirs only."""
    gathered = gather_objects((result.ids, result.assignments))
    if gathered is None:
        return
    ids, assignments = (np.concatenate(parts) for parts in zip(*gathered, strict=True))
    write_clusters(out, dataclasses.replace(result, ids=ids, assignments=assignments, attrs=attrs))


def cluster_super(
    *,
    shards: list[str],
    pca: str,
    out: str,
    super_clusters: int,
    iterations: int,
    seed: int,
    cache_mb: float,
    dtype: str,
) -> None:
    """Stage 'super-clusters': level 1, ``super_clusters`` (m) clusters over every image."""
    require_rows(super_clusters, sum(shard_rows(p) for p in shards), "methods.deepercluster.super_clusters")
    source = whitened_shards(shards, pca, cache_mb, out, dtype=dtype)
    log.info("level 1: %d super-clusters over %d images on this rank", super_clusters, source.count)
    result = kmeans(source, super_clusters, iterations, level_seed(seed, None))
    write_result(out, result, level="super", pca_sha256=sha256(pca), seed=seed, iterations=iterations)
    source.discard()


def cluster_sub(
    *,
    shards: list[str],
    pca: str,
    super_file: str,
    super_cluster: int,
    out: str,
    sub_clusters: int,
    iterations: int,
    seed: int,
    cache_mb: float,
    dtype: str,
) -> None:
    """Stage 'sub-clusters': level 2, ``sub_clusters`` (k) clusters inside super-cluster ``super_cluster``.

    A super-cluster with fewer images than k gets one sub-cluster per image, with a warning.
    """
    level1 = read_clusters(super_file)
    members = level1.ids[level1.assignments == super_cluster]
    if len(members) == 0:
        raise ClustersError(
            f"super-cluster {super_cluster} of {super_file} is empty: delete it and rerun the super_clusters stage"
        )
    k = min(sub_clusters, len(members))
    if k < sub_clusters:
        log.warning(
            "super-cluster %d has %d images, fewer than its k = %d sub-clusters: using k=%d",
            super_cluster,
            len(members),
            sub_clusters,
            k,
        )
    source = whitened_shards(shards, pca, cache_mb, out, keep_ids=members, dtype=dtype, super_sha256=sha256(super_file))
    log.info(
        "level 2: %d sub-clusters inside super-cluster %d (%d images on this rank)", k, super_cluster, source.count
    )
    result = kmeans(source, k, iterations, level_seed(seed, super_cluster))
    write_result(
        out,
        result,
        level="sub",
        super_cluster=super_cluster,
        super_sha256=sha256(super_file),
        pca_sha256=sha256(pca),
        seed=seed,
        iterations=iterations,
    )
    source.discard()


def cluster_flat(
    *, features: str, pca: str, out: str, k: int, iterations: int, seed: int, cache_mb: float, dtype: str
) -> None:
    """Stage 'eval-kmeans': ``k`` clusters over the images of one checkpoint's ``features.h5`` (the evaluations'
    clusters.png), on one rank."""
    require_rows(k, shard_rows(features), "evaluation.clusters")
    source = whitened_shards([features], pca, cache_mb, out, dtype=dtype)
    log.info("flat k-means: %d clusters over %d images", k, source.count)
    result = kmeans(source, k, iterations, level_seed(seed, None))
    write_result(out, result, level="flat", pca_sha256=sha256(pca), seed=seed, iterations=iterations)
    source.discard()
