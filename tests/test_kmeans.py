"""k-means on real whitened Fashion-MNIST features: descent, faiss parity, ranks, empty clusters, seeds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import deepercluster.cluster.kmeans as kmeans_module
import deepercluster.cluster.rows as rows_module
from deepercluster.cluster.kmeans import (
    SPLIT_EPS,
    assign,
    centroid_index,
    initial_centroids,
    kmeans,
    nearest_centroid,
    split_empty_clusters,
)
from deepercluster.cluster.levels import cluster_sub, cluster_super, whitened_shards
from deepercluster.cluster.rows import ShardSource
from deepercluster.distributed import gather_objects, init_distributed
from deepercluster.formats.clusters import read_clusters
from deepercluster.formats.whitening import Whitening
from deepercluster.seeds import id_hash
from defaults import kmeans_settings

pytestmark = pytest.mark.usefixtures("single_process")


def _objective(x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> float:
    """Sum of squared distances of each row to its assigned centroid, in float64."""
    return float(((x.astype(np.float64) - centroids[assignments].astype(np.float64)) ** 2).sum())


def test_objective_never_increases(real_data, whitened) -> None:
    source = whitened_shards(real_data.shards, real_data.pca, cache_mb=64, dtype="float16")
    result = kmeans(source, k=20, iterations=12, seed=0)
    objective = result.objective
    assert objective.shape == (13,) and result.reseeded.shape == (13,)
    # Lloyd's descent: each pass is no worse than the previous one (up to float noise).
    assert np.all(objective[1:] <= objective[:-1] * (1 + 1e-6)), objective
    assert objective[-1] < 0.9 * objective[0]  # it did move
    # The last entry is the objective of the returned centroids and assignments.
    ids, x = whitened
    assert np.array_equal(result.ids, ids)
    assert objective[-1] == pytest.approx(_objective(x, result.centroids, result.assignments), rel=1e-5)
    assert np.array_equal(result.sizes, np.bincount(result.assignments, minlength=20))


def test_matches_faiss_kmeans(whitened, array_source) -> None:
    ids, x = whitened
    k, iterations, seed = 40, 4, 3
    source = array_source(ids, x)
    ours = kmeans(source, k, iterations, seed)

    reference = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        max_points_per_centroid=len(x),  # no subsampling
        min_points_per_centroid=1,
        early_stop_threshold=-1.0,  # run all niter iterations, as ours does
    )
    reference.train(x, init_centroids=initial_centroids(source, k, seed))
    # faiss's obj[i] is the objective of the assignment with the centroids after i updates,
    # for i < niter, like our objective[i]: so our objective[iterations - 1] compares with
    # faiss's last obj. Our extra last entry assigns with the centroids after all
    # `iterations` updates, which compares with faiss's final centroids searched once more.
    assert len(reference.obj) == iterations and len(ours.objective) == iterations + 1
    assert ours.objective[iterations - 1] == pytest.approx(reference.obj[-1], rel=0.02)
    distances, _ = reference.index.search(x, 1)
    assert ours.objective[-1] == pytest.approx(float(distances.astype(np.float64).sum()), rel=0.02)
    assert ours.objective[0] == pytest.approx(reference.obj[0], rel=1e-4)  # same initial centroids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_on_rank(rank: int, world_size: int, port: int, shards: list[str], pca: str, out: str) -> None:
    """One of ``world_size`` real processes: join the gloo group, run the super_clusters stage."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    context = init_distributed()
    assert (context.rank, context.world_size) == (rank, world_size)
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    # This rank's share of the shards, as the stage takes it.
    rows = whitened_shards(shards, pca, cache_mb=64, dtype="float16").count
    Path(f"{out}.rank{rank}.rows").write_text(str(rows))
    cluster_super(shards=shards, pca=pca, out=out, super_clusters=8, **kmeans_settings(iterations=6, seed=5))
    # The assignments travel to the writing rank only: the others get nothing back.
    Path(f"{out}.rank{rank}.gathered").write_text(repr(gather_objects(f"from {rank}")))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_match_one_rank(real_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = str(tmp_path / "one" / "super.h5"), str(tmp_path / "two" / "super.h5")
    (tmp_path / "two").mkdir()
    cluster_super(
        shards=real_data.shards, pca=real_data.pca, out=one, super_clusters=8, **kmeans_settings(iterations=6, seed=5)
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # two CPU ranks on gloo, even on a GPU machine
    mp.spawn(
        _cluster_on_rank,
        args=(2, _free_port(), real_data.shards, real_data.pca, two),
        nprocs=2,
        join=True,
    )
    # Rank 0 read shards 0 and 2, rank 1 shard 1.
    assert [int(Path(f"{two}.rank{r}.rows").read_text()) for r in (0, 1)] == [400, 200]
    assert [Path(f"{two}.rank{r}.gathered").read_text() for r in (0, 1)] == ["['from 0', 'from 1']", "None"]
    with h5py.File(one, "r") as a, h5py.File(two, "r") as b:
        assert np.array_equal(a["ids"][:], np.arange(600)) and np.array_equal(a["ids"][:], b["ids"][:])
        assert np.array_equal(a["assignments"][:], b["assignments"][:])
        # Equal to the bit on an Intel Xeon, and passed on an AMD EPYC (issue 29). rtol 1e-5 (about 100 float32
        # ulps) leaves room for another CPU's rounding of the float32 centroids; the objective, a float64 sum, 1e-9.
        assert np.allclose(a["centroids"][:], b["centroids"][:], rtol=1e-5, atol=1e-6)
        assert np.array_equal(a["sizes"][:], b["sizes"][:])
        assert np.allclose(a["objective"][:], b["objective"][:], rtol=1e-9)
        assert np.array_equal(a["reseeded"][:], b["reseeded"][:])
        assert dict(a.attrs) == dict(b.attrs)
        assert len(np.unique(a["assignments"][:])) == 8


@pytest.mark.parametrize("iterations", [0, 10])
def test_no_cluster_ends_empty(whitened, array_source, iterations: int) -> None:
    """300 copies of one image beside 600 real ones: seeds drawn among copies start as twins."""
    ids, x = whitened
    x = np.concatenate([x, np.repeat(x[:1], 300, axis=0)])
    ids = np.arange(len(x))
    k = 60
    result = kmeans(array_source(ids, x), k, iterations, seed=0)
    assert result.reseeded.sum() > 0
    assert result.reseeded[0 if iterations else -1] > 0  # iterations=0: the final re-splits did it
    assert (result.sizes > 0).all(), result.sizes
    assert np.array_equal(result.sizes, np.bincount(result.assignments, minlength=k))
    assert result.sizes.sum() == len(x)


def test_result_consistent_when_a_cluster_cannot_be_filled(whitened, array_source, caplog) -> None:
    """3 distinct real rows, 4 copies each, k=4: one cluster must stay empty; the result and the log say so."""
    _, x = whitened
    x = np.repeat(x[:3], 4, axis=0)
    k = 4
    with caplog.at_level("WARNING", logger="deepercluster.kmeans"):
        result = kmeans(array_source(np.arange(len(x)), x), k, iterations=3, seed=0)
    assert len(np.unique(result.assignments)) == 3  # only 3 distinct points to assign
    assert np.array_equal(result.sizes, np.bincount(result.assignments, minlength=k))
    assert (result.sizes == 0).sum() == 1
    assert "1 clusters are still empty" in caplog.text
    assert result.objective[-1] == pytest.approx(
        _objective(x, result.centroids, result.assignments), rel=1e-3, abs=1e-9
    )


def test_split_empty_clusters_by_hand() -> None:
    centroids = np.array([[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0], [-1.0, 0.5, 0.0, 2.0]], np.float32)
    original = centroids.copy()
    counts = np.array([5, 0, 1])
    assert split_empty_clusters(centroids, counts, np.random.default_rng(0)) == 1
    # Only cluster 0 has a point to spare: it is split into two symmetric halves.
    sign = np.array([1.0, -1.0, 1.0, -1.0])
    assert np.allclose(centroids[1], original[0] * (1 + sign * SPLIT_EPS))
    assert np.allclose(centroids[0], original[0] * (1 - sign * SPLIT_EPS))
    assert np.array_equal(centroids[2], original[2])
    assert counts.tolist() == [3, 2, 1]

    # The two halves really split a cloud of distinct points around the old centroid.
    cloud = original[0] + np.random.default_rng(1).normal(0, 0.01, (200, 4)).astype(np.float32)
    labels, _ = nearest_centroid(cloud, centroid_index(centroids[:2]))
    assert 0 < labels.sum() < len(cloud)

    # Two empty clusters: both re-seeded, no point lost, none left empty.
    centroids = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    counts = np.array([6, 0, 0, 2])
    assert split_empty_clusters(centroids, counts, np.random.default_rng(0)) == 2
    assert counts.sum() == 8 and (counts > 0).all()


def test_seeded_and_deterministic(real_data, whitened, array_source, tmp_path: Path) -> None:
    whitening = Whitening.load(real_data.pca)
    cached = ShardSource(real_data.shards, whitening, whitening.dim, chunk_rows=64)
    spill = str(tmp_path / "rank0.whitened.h5")
    spilled = ShardSource(real_data.shards, whitening, whitening.dim, cache_mb=0, chunk_rows=64, spill=spill)
    assert spilled._cache is None and cached._cache is not None
    a, b, c = kmeans(cached, 12, 5, seed=7), kmeans(cached, 12, 5, seed=7), kmeans(spilled, 12, 5, seed=7)
    assert np.array_equal(a.assignments, b.assignments) and np.array_equal(a.centroids, b.centroids)
    # Read back from the whitened spill: the same rows in the same chunks, so the same clusters, bit for bit.
    assert np.array_equal(a.ids, c.ids) and np.array_equal(a.assignments, c.assignments)
    assert np.array_equal(a.centroids, c.centroids) and np.array_equal(a.objective, c.objective)
    ids, x = whitened
    source = array_source(ids, x)
    assert not np.array_equal(initial_centroids(source, 12, 7), initial_centroids(source, 12, 8))
    assert not np.array_equal(a.assignments, kmeans(cached, 12, 5, seed=8).assignments)


def test_whitened_once_and_spilled(real_data, tmp_path: Path) -> None:
    """Rows above the cache are whitened in one pass into a spill that every k-means pass reads back; a rerun
    reuses a spill of the same rows and pca file, and redoes one that differs."""
    whitening = Whitening.load(real_data.pca)
    calls = []

    def counted(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return whitening(x)

    spill = str(tmp_path / "rank0.whitened.h5")
    source = ShardSource(
        real_data.shards, counted, whitening.dim, cache_mb=0, chunk_rows=64, spill=spill, pca_sha256="abc"
    )
    kmeans(source, 12, 5, seed=7)
    assert sum(calls) == 600  # each row whitened once, for 7 passes (the initial rows, 5 iterations, the final one)
    with h5py.File(spill, "r") as f:
        assert f["x"].dtype == np.float16 and f.attrs["pca_sha256"] == "abc"
        assert np.array_equal(f["ids"][:], source.ids) and list(f.attrs["shards"]) == real_data.shards
        # The cache of the same chunks: a GEMM's rounding may depend on how many rows it multiplies (MKL on AMD).
        cached = np.concatenate(
            [x for _, x in ShardSource(real_data.shards, whitening, whitening.dim, chunk_rows=64).chunks()]
        )
        assert np.array_equal(f["x"][:], cached)
    ShardSource(real_data.shards, counted, whitening.dim, cache_mb=0, spill=spill, pca_sha256="abc")
    assert sum(calls) == 600  # reused
    ShardSource(real_data.shards, counted, whitening.dim, cache_mb=0, spill=spill, pca_sha256="other")
    assert sum(calls) == 1200  # another whitening: written again
    source.discard()
    assert not Path(spill).exists()


def test_initial_centroids_ignore_partition(real_data, whitened, array_source, tmp_path: Path) -> None:
    ids, x = whitened
    assert np.array_equal(ids, np.arange(600))
    k, seed = 25, 11
    whole = initial_centroids(array_source(ids, x, chunk_rows=len(ids)), k, seed)
    # The k rows with the smallest seeded hash of their id, in hash order.
    chosen = ids[np.argsort(id_hash(ids, seed))[:k]]
    assert np.array_equal(whole, x[chosen])  # ids are 0..599 in row order
    # The same rows as two parts (second half first, each reversed) in odd-sized chunks.
    half = len(ids) // 2
    order = np.concatenate([np.arange(len(ids) - 1, half - 1, -1), np.arange(half - 1, -1, -1)])
    parts = array_source(ids[order], x[order], chunk_rows=37)
    assert np.array_equal(initial_centroids(parts, k, seed), whole)
    whitening = Whitening.load(real_data.pca)
    # Shards in reverse order, spilled and read in 50-row chunks: the same rows (whitened in other
    # chunks, so equal up to float32 rounding of the whitening matmul, which can move a float16 row by one step).
    shards = ShardSource(
        real_data.shards[::-1], whitening, whitening.dim, cache_mb=0, chunk_rows=50, spill=str(tmp_path / "spill.h5")
    )
    streamed = initial_centroids(shards, k, seed)
    assert np.allclose(streamed, whole, rtol=2**-10, atol=1e-5)
    nearest, _ = nearest_centroid(streamed, centroid_index(x))
    assert np.array_equal(ids[nearest], chosen)


def test_one_index_per_pass_same_assignments(whitened, array_source, monkeypatch: pytest.MonkeyPatch) -> None:
    """The centroids' faiss index is built once per assignment pass, not once per chunk, and assigns as before."""
    ids, x = whitened
    source = array_source(ids, x, chunk_rows=50)  # 12 chunks a pass
    counted = {"builds": 0, "passes": 0}

    def counting(function, key):
        def wrapper(*args):
            counted[key] += 1
            return function(*args)

        return wrapper

    monkeypatch.setattr(kmeans_module, "centroid_index", counting(kmeans_module.centroid_index, "builds"))
    monkeypatch.setattr(kmeans_module, "assign", counting(kmeans_module.assign, "passes"))
    result = kmeans(source, k=20, iterations=4, seed=1)
    assert counted["passes"] >= 5 and counted["builds"] == counted["passes"]
    # As before the change: a fresh exact index of the final centroids for every chunk.
    before = []
    for _, chunk in source.chunks():
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(result.centroids)
        before.append(index.search(chunk, 1)[1][:, 0])
    assert np.array_equal(result.assignments, np.concatenate(before))
    assert len(np.unique(result.assignments)) == 20


def test_float16_rows_hold(real_data) -> None:
    """Rows kept as float16 (the default) cluster as float32 rows do: the objective within 0.1%, the same
    assignments to the same centroids, and nearly all the same after ten iterations from the same start."""
    whitening = Whitening.load(real_data.pca)
    dtypes = ("float16", "float32")
    rows = {dtype: ShardSource(real_data.shards, whitening, whitening.dim, dtype=dtype) for dtype in dtypes}
    half, single = (kmeans(rows[dtype], 50, 10, seed=0) for dtype in dtypes)
    assert half.objective[-1] == pytest.approx(single.objective[-1], rel=1e-3)
    _, assignments, *_ = assign(rows["float16"], single.centroids)
    assert (assignments == single.assignments).mean() >= 0.999
    assert (half.assignments == single.assignments).mean() >= 0.99  # 600 rows: one flip is 0.17%


def test_sub_jobs_read_each_row_once(real_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the cache, the m sub-cluster jobs together read each row from the shards once (each job only its
    super-cluster's rows), then only their spills; the clusters are those of rows cached in memory."""
    read: dict[str, int] = {}

    def counting(name: str, function):
        def wrapper(*args):
            for item in function(*args):
                read[name] = read.get(name, 0) + len(item if isinstance(item, np.ndarray) else item[1])
                yield item

        return wrapper

    for name in ("read_chunks", "read_rows", "read_spill"):
        monkeypatch.setattr(rows_module, name, counting(name, getattr(rows_module, name)))
    for cache_mb, folder in ((0, tmp_path / "spilled"), (64, tmp_path / "cached")):
        super_file, settings = str(folder / "super.h5"), kmeans_settings(iterations=2, seed=0, cache_mb=cache_mb)
        common = {"shards": real_data.shards, "pca": real_data.pca, **settings}
        cluster_super(out=super_file, super_clusters=3, **common)
        read.clear()
        for s in range(3):
            cluster_sub(
                super_file=super_file, super_cluster=s, out=str(folder / f"sub-{s}.h5"), sub_clusters=4, **common
            )
        assert read.get("read_chunks", 0) == 0 and read["read_rows"] == 600  # each row once, over the 3 jobs
        assert read.get("read_spill", 0) >= (4 * 600 if cache_mb == 0 else 0)  # initial rows, 2 iterations, final
        assert not list(folder.glob("*.whitened.h5"))  # each job removed its spill
    for name in ("super.h5", *(f"sub-{s}.h5" for s in range(3))):
        spilled, cached = (read_clusters(str(tmp_path / f / name), centroids=True) for f in ("spilled", "cached"))
        assert np.array_equal(spilled.assignments, cached.assignments)
        assert np.array_equal(spilled.centroids, cached.centroids)
