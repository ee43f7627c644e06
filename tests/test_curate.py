"""A curated subset for real: the test config's pool (300 Fashion-MNIST images) clustered for one round, 100 of
its images drawn balanced over round 1's clusters, its figures in the report, and DeeperCluster trained on it in
the same DAG (curation.train); then the stage itself on the run's files (nearest, duplicates, bad input)."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deepercluster.config import validate_config
from deepercluster.data.curate import balanced_shares, curate
from deepercluster.errors import ClustersError, ConfigError
from deepercluster.files import sha256
from deepercluster.formats.clusters import read_clusters
from deepercluster.formats.features import write_shard
from deepercluster.formats.whitening import Whitening
from deepercluster.plan import Plan
from test_report import report_variable
from test_workflow import snakemake

ROUND = "results/rounds/1"
CURATED = "results/curated/round-1"
# The pool's run and the curated run: one round each (methods.deepercluster), the subset 100 of the 300 images,
# trained for 3 epochs (curation.epochs_per_round): as many steps as the pool's run's 1 epoch.
CONFIG = {
    "methods": {
        "deepercluster": {"init": "random", "rounds": 1, "epochs_per_round": 1, "super_clusters": 2, "sub_clusters": 4}
    },
    "curation": {"clusters": "round-1", "size": 100, "train": "deepercluster", "epochs_per_round": 3},
}


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("curated")
    run = snakemake(workdir, **CONFIG)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def stage_files(workdir: Path) -> dict[str, object]:
    """The curate stage's inputs in ``workdir``'s run: the pool, round 1's clusters and whitened features."""
    return {
        "manifest": str(workdir / "results/data/manifest.parquet"),
        "labels": str(workdir / ROUND / "labels.parquet"),
        "sub_files": [str(workdir / ROUND / f"clusters/sub-{s}.h5") for s in range(2)],
        "shards": [str(workdir / ROUND / f"features/shard-{i}.h5") for i in range(2)],
        "pca": str(workdir / ROUND / "pca.h5"),
    }


# The stage's settings in the direct calls below.
SETTINGS = {
    "size": 100,
    "strategy": "random",
    "balance": "hierarchy",
    "duplicate_similarity": 0.95,
    "seed": 0,
    "cache_mb": 64,
    "dtype": "float32",
}


def curated(folder: Path, files: dict[str, object], **settings: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stage on ``files`` with ``settings`` (over ``SETTINGS``), writing into ``folder``: the subset and its
    sizes, read back."""
    out, sizes = folder / "manifest.parquet", folder / "sizes.tsv"
    curate(**files, **{**SETTINGS, **settings}, out=str(out), sizes=str(sizes))
    return pd.read_parquet(out), pd.read_csv(sizes, sep="\t")


def whitened(workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of the pool, read from round 1's shards and whitened by its PCA here."""
    ids, raw = [], []
    for path in stage_files(workdir)["shards"]:
        with h5py.File(path) as f:
            ids.append(f["ids"][:])
            raw.append(f["features"][:])
    return np.concatenate(ids), Whitening.load(stage_files(workdir)["pca"])(np.concatenate(raw))


def test_balanced_shares_split_equally_and_give_what_a_small_cluster_leaves_to_the_others() -> None:
    # Equal shares of 20 over 4 clusters are 5: the cluster of 1 and the one of 3 give all they have, the 16 left
    # go equally to the two others.
    assert balanced_shares(np.array([1, 50, 3, 10]), 20).tolist() == [1, 8, 3, 8]
    assert balanced_shares(np.array([7, 7, 7]), 10).tolist() == [3, 3, 4]  # what does not divide: the last
    assert balanced_shares(np.array([2, 0, 5]), 100).tolist() == [2, 0, 5]  # a budget above the pool: all of it


def test_the_subset_is_a_manifest_balanced_over_the_rounds_clusters(curated_run: Path) -> None:
    pool = pd.read_parquet(curated_run / "results/data/manifest.parquet").set_index("id")
    labels = pd.read_parquet(curated_run / ROUND / "labels.parquet").set_index("id")
    subset = pd.read_parquet(curated_run / CURATED / "manifest.parquet")
    assert subset.columns.tolist() == ["id", "path", "label", "split", "pool_id", "super_cluster", "sub_cluster"]
    assert subset["id"].tolist() == list(range(100)) and subset["pool_id"].is_monotonic_increasing
    assert subset["pool_id"].is_unique and subset["pool_id"].isin(pool.index).all()
    at = subset["pool_id"].to_numpy()
    for column in ("path", "label"):
        assert subset[column].tolist() == pool.loc[at, column].tolist()
    for column in ("super_cluster", "sub_cluster"):
        assert subset[column].tolist() == labels.loc[at, column].tolist()

    # 50 images from each super-cluster; inside one, the sub-clusters not giving all they have within one image.
    sizes = pd.read_csv(curated_run / CURATED / "cluster_sizes.tsv", sep="\t")
    drawn = subset.groupby(["super_cluster", "sub_cluster"]).size()
    assert sizes.set_index(["super_cluster", "sub_cluster"])["curated"].to_dict() == drawn.to_dict()
    assert sizes["pool"].tolist() == labels.groupby(["super_cluster", "sub_cluster"]).size().tolist()
    for _, one in sizes.groupby("super_cluster"):
        assert one["curated"].sum() == 50
        short = one[one["curated"] < one["pool"] - one["duplicates"]]["curated"]
        assert short.max() - short.min() <= 1 and (one["curated"] <= short.max()).all()
    log = (curated_run / "results/logs/curated/round-1/manifest.log").read_text()
    assert f"{sizes['duplicates'].sum()} of 300 images are duplicates" in log


def test_the_curated_run_trains_on_the_subset(curated_run: Path) -> None:
    run = curated_run / CURATED / "deepercluster"
    checkpoint = torch.load(run / "rounds/1/checkpoint.pt", weights_only=True)
    assert checkpoint["provenance"]["manifest_sha256"] == sha256(curated_run / CURATED / "manifest.parquet")
    with h5py.File(run / "rounds/1/features/shard-0.h5") as f:  # 100 images: one shard of features.shard_size 150
        assert f["ids"][:].tolist() == list(range(100))
        assert f.attrs["checkpoint_sha256"] == sha256(curated_run / "results/rounds/0/checkpoint.pt")
    assert not (run / "rounds/1/features/shard-1.h5").exists()
    assert pd.read_parquet(run / "rounds/1/labels.parquet")["id"].tolist() == list(range(100))
    metrics = pd.read_csv(run / "rounds/1/train/metrics.tsv", sep="\t")
    pool = pd.read_csv(curated_run / ROUND / "train/metrics.tsv", sep="\t")
    assert metrics["epoch"].tolist() == [e for e in range(3) for _ in range(100 // 32)]  # 3 epochs of full batches
    assert len(metrics) == len(pool) == 300 // 32  # as many steps as the pool's run's 1 epoch
    nmi = json.loads((run / "rounds/1/nmi.json").read_text())
    assert set(nmi) == {"label", "super_cluster", "sub_cluster", "previous_round"}  # pool_id is no metadata


def test_the_report_shows_the_subsets_sizes_and_images_beside_the_pools(curated_run: Path) -> None:
    built = snakemake(curated_run, "--report", "report.zip", **CONFIG)
    assert built.returncode == 0, built.stderr[-3000:]
    with zipfile.ZipFile(curated_run / "report.zip") as archive:
        html = archive.read("report/report.html").decode()
        results, categories = report_variable(html, "results"), report_variable(html, "categories")
        figures = sorted(f"{CURATED}/figures/{name}.png" for name in ("cluster_sizes", "clusters"))
        assert categories["Curation"] == {"round-1": figures}
        for path in figures:
            assert results[path]["labels"]["subset"] == "round-1"
            image = Image.open(io.BytesIO(archive.read(f"report/{results[path]['data_uri']}")))
            assert image.format == "PNG" and image.width >= 400, (path, image.size)
            assert len(np.unique(np.asarray(image.convert("L")))) > 10, f"{path} is blank"


@pytest.mark.usefixtures("single_process")
def test_nearest_draws_the_images_nearest_each_centroid(curated_run: Path, tmp_path: Path) -> None:
    subset, _ = curated(tmp_path, stage_files(curated_run), strategy="nearest")
    ids, x = whitened(curated_run)
    labels = pd.read_parquet(curated_run / ROUND / "labels.parquet").set_index("id").loc[ids]
    chosen = np.isin(ids, subset["pool_id"])
    for s in range(2):
        centroids = read_clusters(stage_files(curated_run)["sub_files"][s], centroids=True).centroids
        for j in range(len(centroids)):
            members = (labels["super_cluster"].to_numpy() == s) & (labels["sub_cluster"].to_numpy() == j)
            distance = np.sum((x - centroids[j]) ** 2, axis=1)
            assert chosen[members].any()
            if (~chosen[members]).any():
                assert distance[members & chosen].max() <= distance[members & ~chosen].min() + 1e-5


@pytest.mark.usefixtures("single_process")
def test_balance_none_draws_the_control_a_uniform_random_subset_of_the_pool(curated_run: Path, tmp_path: Path) -> None:
    """The control of the same size: each sub-cluster's images in it near its share of the pool (binomial, within
    4 sd), where the curated subset gives each the same; seeded."""
    files = stage_files(curated_run)
    settings = {
        "control": {"balance": "none"},
        "again": {"balance": "none"},
        "reseeded": {"balance": "none", "seed": 1},
    }
    subsets, sizes = {}, {}
    for name, own in {**settings, "curated": {}}.items():
        (tmp_path / name).mkdir()
        subsets[name], sizes[name] = curated(tmp_path / name, files, size=200, **own)
    assert subsets["control"].equals(subsets["again"]) and not subsets["control"].equals(subsets["reseeded"])
    assert subsets["control"]["pool_id"].is_unique and len(subsets["control"]) == 200
    keys = ["super_cluster", "sub_cluster"]
    pool = pd.read_parquet(curated_run / ROUND / "labels.parquet").groupby(keys).size()
    share = pool / pool.sum()
    control = subsets["control"].groupby(keys).size().reindex(pool.index, fill_value=0)
    spread = 4 * np.sqrt(200 * share * (1 - share))
    assert ((control - 200 * share).abs() <= spread).all(), pd.DataFrame({"control": control, "expected": 200 * share})
    balanced = sizes["curated"].set_index(keys)
    whole = balanced["curated"] == balanced["pool"] - balanced["duplicates"]  # smaller than its share: all of it
    assert (whole | (balanced["curated"] >= balanced["curated"].max() - 1)).all(), balanced  # else equal shares
    assert pool.max() > 1.5 * pool.min(), pool  # the pool's sub-clusters differ enough to tell the two apart


@pytest.mark.usefixtures("single_process")
def test_an_image_whose_features_equal_anothers_is_kept_once(curated_run: Path, tmp_path: Path) -> None:
    # Image b gets the features of image a < b of its sub-cluster: b is a duplicate, a is kept.
    labels = pd.read_parquet(curated_run / ROUND / "labels.parquet")
    a, b = labels[(labels["super_cluster"] == 1) & (labels["sub_cluster"] == 2)]["id"].to_numpy()[[0, -1]]
    files = stage_files(curated_run)
    files["shards"] = [str(tmp_path / Path(path).name) for path in files["shards"]]
    raw = {}
    for source, copied in zip(stage_files(curated_run)["shards"], files["shards"], strict=True):
        with h5py.File(source) as f:
            raw[copied] = (f["features"][:], f["ids"][:], dict(f.attrs))
    rows = {
        i: (path, int(np.flatnonzero(ids == i)[0])) for path, (_, ids, _) in raw.items() for i in (a, b) if i in ids
    }
    raw[rows[b][0]][0][rows[b][1]] = raw[rows[a][0]][0][rows[a][1]]
    for path, (features, ids, attrs) in raw.items():
        write_shard(path, features, ids, **attrs)
    subset, sizes = curated(tmp_path, files, size=300, duplicate_similarity=0.9999)
    kept = subset["pool_id"]
    assert len(kept) == 299 and a in kept.values and b not in kept.values
    counted = sizes.set_index(["super_cluster", "sub_cluster"])["duplicates"]
    assert counted.sum() == 1 and counted[(1, 2)] == 1


def test_a_registered_checkpoints_clusters_are_round_1_of_the_run_starting_from_it() -> None:
    registered = {"checkpoints": {"mine": "mine.pt"}, "curation": {"clusters": "mine", "train": "rotnet"}}
    for method, run in (("deepercluster", "results"), ("rotnet", "results/deepercluster")):
        config = {**copy.deepcopy(registered), "method": method, "methods": {"deepercluster": {"init": "mine"}}}
        plan = Plan(validate_config(config))
        assert plan.curated_clusters("mine") == (run, 1)  # round 1 clusters the pool with its features
        assert plan.curated == "results/curated/mine/rotnet" and plan.runs[plan.curated].name == "rotnet"
        assert plan.manifest(plan.curated) == "results/curated/mine/manifest.parquet"
        assert plan.manifest(run) == "results/data/manifest.parquet"


@pytest.mark.usefixtures("single_process")
def test_bad_input_is_one_line_naming_the_key_or_file_and_the_fix(curated_run: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^curation.size is 301, more than the 300 images of .*: set it to at most 300$"
    ):
        curated(tmp_path, stage_files(curated_run), size=301)
    # Clusters of another manifest: round 1's of the pool, drawn from as if they were the subset's.
    other = {**stage_files(curated_run), "manifest": str(curated_run / CURATED / "manifest.parquet")}
    with pytest.raises(ClustersError, match=r"shard-0.h5 holds the features of another manifest than .*: curate"):
        curated(tmp_path, other, size=10)
    assert not (tmp_path / "manifest.parquet").exists()

    # A round of a method that does not cluster, a round past the last, a checkpoint no run starts from.
    base = {"method": "rotnet", "methods": copy.deepcopy(CONFIG["methods"]), "checkpoints": {"mine": "mine.pt"}}
    for method, name, message in [
        ("rotnet", "round-1", r"the main run's method, rotnet, makes no clusters; curate a round of a method"),
        ("deepercluster", "round-2", r"the main run has no round 2 with clusters; curate one of round-1..round-1$"),
        ("deepercluster", "mine", r"no run clusters the pool with checkpoint mine's features; set methods"),
    ]:
        with pytest.raises(ConfigError, match=f"^results/curated/{name}: {message}"):
            Plan(validate_config({**copy.deepcopy(base), "method": method, "curation": {"clusters": name}}))
    with pytest.raises(ConfigError, match=r"^curation.train is 'rotnet' but curation.clusters is null: set it"):
        Plan(validate_config({**copy.deepcopy(base), "curation": {"train": "rotnet"}}))
    # Asked for by its path, in snakemake: the same line.
    planned = snakemake(curated_run, "-n", f"{CURATED}/manifest.parquet", method="rotnet", curation={})
    said = planned.stdout + planned.stderr
    assert (
        planned.returncode != 0 and "results/curated/round-1: the main run's method, rotnet, makes no clusters" in said
    )
