"""The two k-means levels of a round: m super-clusters over all images, then k sub-clusters in each.

Both levels run the same ``kmeans`` over the PCA-whitened shards; ranks split the shards
(``shards[rank::world_size]``) and rank 0 writes the result. A clusters file holds
``centroids`` (k x d), ``ids`` and ``assignments`` (sorted by id), ``objective`` and
``reseeded`` per pass, and ``sizes``.
"""

from __future__ import annotations

import logging

import h5py
import numpy as np

from deepercluster.distributed import all_gather_objects, init_distributed, is_main_process
from deepercluster.errors import ClustersError
from deepercluster.files import atomic_output, sha256
from deepercluster.kmeans import KMeansResult, kmeans
from deepercluster.pca import Whitening
from deepercluster.shards import ShardSource, require_rows, shard_rows

log = logging.getLogger(__name__)


def level_seed(seed: int, super_cluster: int | None) -> int:
    """The k-means seed of level 1 (``super_cluster`` None) or of one super-cluster's level 2."""
    key = [seed] if super_cluster is None else [seed, 1 + super_cluster]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def whitened_shards(shards: list[str], pca: str, cache_mb: float, keep_ids: np.ndarray | None = None) -> ShardSource:
    """This rank's share of the shards, PCA-whitened and L2-normalised."""
    context = init_distributed()
    whitening = Whitening.load(pca)
    mine = shards[context.rank :: context.world_size]
    return ShardSource(mine, whitening, whitening.dim, keep_ids=keep_ids, cache_mb=cache_mb)


def write_clusters(out: str, result: KMeansResult, **attrs: object) -> None:
    """Gather every rank's assignments; rank 0 writes them sorted by id."""
    gathered = all_gather_objects((result.ids, result.assignments))
    ids = np.concatenate([g[0] for g in gathered])
    assignments = np.concatenate([g[1] for g in gathered])
    if not is_main_process():
        return
    order = np.argsort(ids)
    with atomic_output(out) as partial, h5py.File(partial, "w") as f:
        f["centroids"] = result.centroids
        f["ids"] = ids[order]
        f["assignments"] = assignments[order]
        f["objective"] = result.objective
        f["reseeded"] = result.reseeded
        f["sizes"] = result.sizes
        f.attrs.update(k=len(result.centroids), **attrs)


def open_clusters(path: str) -> h5py.File:
    """Open a clusters file for reading; a missing, truncated or foreign one gets one message and the fix."""
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise ClustersError(f"clusters file {path} is unreadable ({error}): delete it and rerun its stage") from error
    if "ids" not in f or "assignments" not in f:
        f.close()
        raise ClustersError(f"{path} lacks 'ids' and 'assignments', so it is no clusters file: delete it and rerun")
    return f


def read_assignments(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, assignments) of a clusters file."""
    with open_clusters(path) as f:
        return f["ids"][:], f["assignments"][:]


def cluster_super(
    *,
    shards: list[str],
    pca: str,
    out: str,
    super_clusters: int,
    iterations: int,
    seed: int,
    cache_mb: float = 4096,
) -> None:
    """Stage 'super_clusters': level 1, ``super_clusters`` (m) clusters over every image."""
    require_rows(super_clusters, sum(shard_rows(p) for p in shards), "kmeans.super_clusters (evaluation.clusters)")
    source = whitened_shards(shards, pca, cache_mb)
    log.info("level 1: %d super-clusters over %d images on this rank", super_clusters, source.count)
    result = kmeans(source, super_clusters, iterations, level_seed(seed, None))
    write_clusters(out, result, level="super", pca_sha256=sha256(pca), seed=seed, iterations=iterations)


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
    cache_mb: float = 4096,
) -> None:
    """Stage 'sub_clusters': level 2, ``sub_clusters`` (k) clusters inside super-cluster ``super_cluster``.

    A super-cluster with fewer images than k gets one sub-cluster per image, with a warning.
    """
    ids, assignments = read_assignments(super_file)
    members = ids[assignments == super_cluster]
    if len(members) == 0:
        raise ClustersError(
            f"super-cluster {super_cluster} of {super_file} is empty: delete it and rerun the super_clusters stage"
        )
    k = min(sub_clusters, len(members))
    if k < sub_clusters:
        log.warning(
            "super-cluster %d has %d images, fewer than kmeans.sub_clusters=%d: using k=%d",
            super_cluster,
            len(members),
            sub_clusters,
            k,
        )
    source = whitened_shards(shards, pca, cache_mb, keep_ids=members)
    log.info(
        "level 2: %d sub-clusters inside super-cluster %d (%d images on this rank)",
        k,
        super_cluster,
        source.count,
    )
    result = kmeans(source, k, iterations, level_seed(seed, super_cluster))
    write_clusters(
        out,
        result,
        level="sub",
        super_cluster=super_cluster,
        super_sha256=sha256(super_file),
        pca_sha256=sha256(pca),
        seed=seed,
        iterations=iterations,
    )
