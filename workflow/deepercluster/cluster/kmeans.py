"""Distributed k-means over a ``FeatureSource``: the clustering step of both papers.

Each rank assigns its own rows to the nearest centroid with faiss and accumulates
per-cluster counts and feature sums; only those are summed across ranks
(``all_reduce_sum``, the identity on one process), so every rank ends each iteration with
the same centroids. Empty clusters are re-seeded by splitting a non-empty one.
"""

from __future__ import annotations

import functools
import logging

import faiss
import numpy as np
import torch

from deepercluster.cluster.rows import FeatureSource
from deepercluster.distributed import all_gather_objects, all_reduce_sum
from deepercluster.formats.clusters import Clusters
from deepercluster.seeds import id_hash

log = logging.getLogger(__name__)

SPLIT_EPS = 1.0 / 1024  # relative perturbation of the two halves of a split cluster (as faiss)
FINAL_SPLITS = 10  # re-seed-and-reassign attempts when the final assignment leaves a cluster empty


@functools.cache
def gpu_resources() -> faiss.StandardGpuResources:
    """This process's one set of faiss GPU resources (streams, scratch memory), made on first use."""
    return faiss.StandardGpuResources()


def centroid_index(centroids: np.ndarray) -> faiss.Index:
    """An exact L2 index of the centroids, on GPU when faiss has one: built once per pass, searched per chunk."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(gpu_resources(), torch.cuda.current_device(), index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest_centroid(x: np.ndarray, index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(cluster index, squared distance) of each row, searched in a ``centroid_index``."""
    distances, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), distances[:, 0].astype(np.float64)


class ClusterSums:
    """Per-cluster counts and float64 sums of float32 rows, added chunk by chunk into buffers reused from chunk to
    chunk (no page faults).

    When k is at most a chunk's rows, the chunk is first summed per cluster in float32 (as faiss sums every row),
    and only those k x D sums are widened: half the work of widening every row, in a buffer no bigger than the
    chunk's. The float64 sums across chunks and ranks keep 1 rank = n ranks to float tolerance.
    """

    def __init__(self, k: int, dim: int) -> None:
        self.counts = torch.zeros(k, dtype=torch.float64)
        self.sums = torch.zeros(k, dim, dtype=torch.float64)
        self._chunk_sums, self._widened = torch.empty(0, dim), torch.empty(0, dim, dtype=torch.float64)

    def add(self, labels: torch.Tensor, rows: torch.Tensor) -> None:
        """Add each of ``rows`` to the sum of its cluster ``labels``."""
        k, n = len(self.sums), len(rows)
        self.counts += torch.bincount(labels, minlength=k)
        if k <= n:
            if len(self._chunk_sums) < k:
                self._chunk_sums = torch.empty_like(self.sums, dtype=torch.float32)
            self.sums += self._chunk_sums.zero_().index_add_(0, labels, rows)
        else:
            if len(self._widened) < n:
                self._widened = torch.empty(n, self.sums.shape[1], dtype=torch.float64)
            self.sums.index_add_(0, labels, self._widened[:n].copy_(rows))


def assign(
    source: FeatureSource, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """One pass over this rank's rows: (ids, their clusters; counts, sums and objective over all ranks).

    The float64 sums are reduced in place: with the centroids and faiss's copy of them, 16 k D bytes a rank, and
    buffers no bigger than a chunk's rows.
    """
    k, dim = centroids.shape
    total, objective = ClusterSums(k, dim), 0.0
    all_ids, all_labels = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    index = centroid_index(centroids)
    single = np.empty((0, dim), np.float32)
    for ids, x in source.chunks():
        if len(x) > len(single):  # the widened rows' buffer, reused chunk after chunk (no page faults)
            single = np.empty((len(x), dim), np.float32)
        rows = torch.from_numpy(single[: len(x)]).copy_(torch.from_numpy(x))  # float16 widened for faiss
        labels, distances = nearest_centroid(rows.numpy(), index)
        total.add(torch.from_numpy(labels), rows)
        objective += distances.sum()
        all_ids.append(ids)
        all_labels.append(labels)
    del index
    totals = all_reduce_sum(torch.cat([total.counts, torch.tensor([objective], dtype=torch.float64)]))
    all_reduce_sum(total.sums)
    counts = totals[:k].numpy().astype(np.int64)
    return np.concatenate(all_ids), np.concatenate(all_labels), counts, total.sums.numpy(), float(totals[-1])


def update_centroids(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
    """Each non-empty cluster's centroid = its mean (``sums`` / ``counts``), in place, ``sums`` overwritten:
    no k x D temporary."""
    filled = (counts > 0)[:, None]
    np.divide(sums, counts[:, None], out=sums, where=filled)
    np.copyto(centroids, sums, where=filled)


def split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed each empty cluster from a random non-empty one, in place; return how many.

    The chosen cluster (probability proportional to its size beyond one point) is copied
    with a tiny symmetric perturbation, so the next assignment splits its points between
    the two. The same ``rng`` on every rank keeps the centroids identical.
    """
    reseeded = 0
    for i in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0)
        if weights.sum() == 0:
            break  # every cluster holds at most one point: nothing left to split
        j = rng.choice(len(counts), p=weights / weights.sum())
        sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
        centroids[i] = centroids[j] * (1 + sign * SPLIT_EPS)
        centroids[j] = centroids[j] * (1 - sign * SPLIT_EPS)
        counts[i] = counts[j] // 2
        counts[j] -= counts[i]
        reseeded += 1
    return reseeded


def initial_centroids(source: FeatureSource, k: int, seed: int) -> np.ndarray:
    """k rows chosen by a seeded hash of their ids: the same choice on any number of ranks; one pass reads them."""
    keys = id_hash(source.ids, seed)  # distinct ids have distinct keys (splitmix64 is a bijection)
    keep = np.argpartition(keys, k - 1)[:k] if k < len(keys) else np.arange(len(keys))
    keep = keep[np.argsort(keys[keep])]
    gathered = all_gather_objects((source.ids[keep], keys[keep]))
    pool, keys = (np.concatenate(parts) for parts in zip(*gathered, strict=True))
    chosen = pool[np.argsort(keys, kind="stable")[:k]]
    if len(chosen) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} rows, the data has {len(chosen)}")
    order = np.argsort(chosen)
    rows = torch.zeros(k, source.dim, dtype=torch.float32)  # each row is non-zero on one rank: its sum is exact
    for ids, x in source.chunks():
        held = np.isin(ids, chosen)
        rows[order[np.searchsorted(chosen[order], ids[held])]] = torch.from_numpy(x[held].astype(np.float32))
    return all_reduce_sum(rows).numpy()


def kmeans(source: FeatureSource, k: int, iterations: int, seed: int) -> Clusters:
    """Lloyd's k-means over every rank's rows; seeded, so the same inputs give the same clusters.

    Each of ``iterations`` passes assigns, recomputes centroids from the reduced sums and
    re-seeds empty clusters; a final pass assigns with the final centroids, re-seeding and
    re-assigning while a cluster is empty (at most ``FINAL_SPLITS`` times). The result holds this rank's rows
    and the sizes over every rank.
    """
    rng = np.random.default_rng(seed)
    centroids = initial_centroids(source, k, seed)
    objective, reseeded = [], []
    for iteration in range(iterations):
        _, _, counts, sums, loss = assign(source, centroids)
        update_centroids(centroids, sums, counts)
        del sums
        objective.append(loss)
        reseeded.append(split_empty_clusters(centroids, counts, rng))
        log.info(
            "k-means k=%d iteration %d/%d: objective %.6g, %d empty clusters re-seeded",
            k,
            iteration + 1,
            iterations,
            loss,
            reseeded[-1],
        )
    final_reseeded = 0
    for attempt in range(FINAL_SPLITS):
        ids, labels, counts, _, loss = assign(source, centroids)
        if (counts > 0).all() or attempt == FINAL_SPLITS - 1:
            break  # the result is this assignment: its counts, centroids and objective agree
        final_reseeded += split_empty_clusters(centroids, counts, rng)
    objective.append(loss)
    reseeded.append(final_reseeded)
    log.info(
        "k-means k=%d done: objective %.6g, cluster sizes min %d median %d max %d, %d empty",
        k,
        loss,
        counts.min(),
        int(np.median(counts)),
        counts.max(),
        int((counts == 0).sum()),
    )
    if (counts == 0).any():
        log.warning(
            "k-means k=%d: %d clusters are still empty after %d re-seedings of the final assignment "
            "(too few distinct rows for k); their sizes are 0 in the clusters file and the summary counts them",
            k,
            int((counts == 0).sum()),
            FINAL_SPLITS,
        )
    return Clusters(centroids, ids, labels, counts, np.array(objective), np.array(reseeded))
