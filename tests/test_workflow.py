"""The workflow for real: snakemake on .test/config.yaml (300 Fashion-MNIST images, 2 shards, 2 rounds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from deepercluster.files import sha256
from deepercluster.formats.clusters import read_clusters

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / ".test" / "config.yaml"


def round_files(r: int) -> list[str]:
    """The clustering stages' files of round r, then its checkpoint."""
    return [
        *[f"results/rounds/{r}/features/shard-{i}.h5" for i in range(2)],
        f"results/rounds/{r}/pca.h5",
        f"results/rounds/{r}/clusters/super.h5",
        *[f"results/rounds/{r}/clusters/sub-{s}.h5" for s in range(2)],
        f"results/rounds/{r}/labels.parquet",
        f"results/rounds/{r}/checkpoint.pt",
    ]


OUTPUTS = ["results/data/manifest.parquet", "results/rounds/0/checkpoint.pt", *round_files(1), *round_files(2)]


def snakemake(workdir: Path, *args: str, **config: object) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir`` on the test config (with ``config`` overrides)."""
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump({**yaml.safe_load(TEST_CONFIG.read_text()), **config}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(configfile)]
    return subprocess.run(
        [*command, "--cores", "2", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )


def clusters_file_sizes(round_dir: Path, name: str) -> list[int]:
    """The ``sizes`` of ``clusters/{name}.h5``: k-means' own count of each cluster, empty ones included."""
    return read_clusters(str(round_dir / "clusters" / f"{name}.h5")).sizes.tolist()


def modification_times(workdir: Path) -> dict[str, int]:
    return {path: (workdir / path).stat().st_mtime_ns for path in OUTPUTS}


def run_method(tmp_path_factory: pytest.TempPathFactory, method: str) -> Path:
    workdir = tmp_path_factory.mktemp(method)
    run = snakemake(workdir, method=method)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def deepercluster_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_method(tmp_path_factory, "deepercluster")


def test_two_rounds_produce_every_stage_file(deepercluster_run: Path) -> None:
    for path in OUTPUTS:
        assert (deepercluster_run / path).is_file(), path
    manifest = pd.read_parquet(deepercluster_run / "results/data/manifest.parquet")
    assert len(manifest) == 300 and manifest["id"].tolist() == list(range(300))

    for r in (1, 2):
        shard_ids = []
        for i in range(2):
            with h5py.File(deepercluster_run / f"results/rounds/{r}/features/shard-{i}.h5") as f:
                assert f["features"].shape == (150, 256) and f["features"].dtype == np.float32
                shard_ids.append(f["ids"][:])
        assert sorted(np.concatenate(shard_ids).tolist()) == list(range(300))

        round_dir = deepercluster_run / f"results/rounds/{r}"
        labels = pd.read_parquet(round_dir / "labels.parquet")
        assert labels["id"].tolist() == list(range(300))
        assert set(labels["super_cluster"]) == {0, 1} and labels["sub_cluster"].between(0, 3).all()
        sizes = pd.read_csv(round_dir / "cluster_sizes.tsv", sep="\t")
        pairs = [(s, c) for s in range(2) for c in range(4)]  # every (super-cluster, sub-cluster) of m=2 x k=4
        assert list(zip(sizes["super_cluster"], sizes["sub_cluster"], strict=True)) == pairs
        counted = [int(((labels["super_cluster"] == s) & (labels["sub_cluster"] == c)).sum()) for s, c in pairs]
        assert sizes["size"].tolist() == counted and sum(counted) == 300
        assert sizes["size"].tolist() == [n for s in range(2) for n in clusters_file_sizes(round_dir, f"sub-{s}")]

        nmi = json.loads((round_dir / "nmi.json").read_text())
        assert set(nmi) == {"label", "previous_round"} and 0.0 < nmi["label"] < 1.0  # split: train, constant
        assert (nmi["previous_round"] is None) == (r == 1)


def test_a_checkpoint_of_round_r_feeds_round_r_plus_1(deepercluster_run: Path) -> None:
    for r in (1, 2):
        checkpoint = deepercluster_run / f"results/rounds/{r - 1}/checkpoint.pt"
        with h5py.File(deepercluster_run / f"results/rounds/{r}/features/shard-0.h5") as f:
            assert f.attrs["checkpoint_sha256"] == sha256(checkpoint)
    first, second = (
        torch.load(deepercluster_run / f"results/rounds/{r}/checkpoint.pt", weights_only=True) for r in (1, 2)
    )
    assert second["provenance"]["previous_sha256"] == sha256(deepercluster_run / "results/rounds/1/checkpoint.pt")
    assert second["provenance"]["labels_sha256"] == sha256(deepercluster_run / "results/rounds/2/labels.parquet")
    # The backbone carried over and trained on: round 2's weights differ from round 1's.
    assert not torch.equal(first["model"]["features.0.weight"], second["model"]["features.0.weight"])


def test_training_metrics_and_summary(deepercluster_run: Path) -> None:
    metrics = pd.read_csv(deepercluster_run / "results/rounds/1/train/metrics.tsv", sep="\t")
    assert metrics["iteration"].tolist() == list(range(300 // 32))  # 1 epoch of full batches of 32
    assert metrics[["loss_super", "loss_sub", "acc_super", "acc_sub"]].notna().all().all()
    assert np.allclose(metrics["loss"], metrics["loss_super"] + metrics["loss_sub"], rtol=1e-5)
    summary = pd.read_csv(deepercluster_run / "results/summary.tsv", sep="\t")
    assert summary["round"].tolist() == [1, 2]
    assert summary["nmi_previous_round"].isna().tolist() == [True, False]
    assert (summary[["seconds_features", "seconds_train", "final_loss"]] > 0).all().all()
    for r in (1, 2):  # the cluster sizes of each round, as its clusters files hold them
        round_dir, row = deepercluster_run / f"results/rounds/{r}", summary.iloc[r - 1]
        sub = [n for s in range(2) for n in clusters_file_sizes(round_dir, f"sub-{s}")]
        every = clusters_file_sizes(round_dir, "super") + sub
        assert row["empty_clusters"] == every.count(0), "empty_clusters: the zeros of the clusters files' sizes"
        assert (row["clusters"], row["size_min"], row["size_max"]) == (len(sub), min(sub), max(sub))


def test_every_long_stage_logs_progress(deepercluster_run: Path) -> None:
    logs = deepercluster_run / "results/logs"
    assert "verify images" in (logs / "data/manifest.log").read_text()
    assert "features shard 0" in (logs / "rounds/1/features/shard-0.log").read_text()
    assert "pca sample" in (logs / "rounds/1/pca.log").read_text()
    assert "iteration 5/5" in (logs / "rounds/1/clusters/super.log").read_text()
    train_log = (logs / "rounds/1/checkpoint.log").read_text()
    assert "training block submitted to local" in train_log and "epoch 1/1 batch 9/9" in train_log


@pytest.mark.parametrize(
    ("deleted", "rerun"),
    [
        (
            "results/rounds/2/clusters/sub-1.h5",
            {"results/rounds/2/clusters/sub-1.h5", "results/rounds/2/labels.parquet", "results/rounds/2/checkpoint.pt"},
        ),
        ("results/rounds/2/features/shard-1.h5", set(round_files(2)) - {"results/rounds/2/features/shard-0.h5"}),
    ],
)
def test_deleting_an_output_reruns_only_it_and_its_dependents(
    deepercluster_run: Path, deleted: str, rerun: set[str]
) -> None:
    before = modification_times(deepercluster_run)
    (deepercluster_run / deleted).unlink()
    run = snakemake(deepercluster_run)
    assert run.returncode == 0, run.stderr[-3000:]
    after = modification_times(deepercluster_run)
    assert {path for path in OUTPUTS if after[path] != before[path]} == rerun


@pytest.mark.parametrize("method", ["deepcluster", "rotnet", "supervised"])
def test_the_other_methods_run_two_rounds(tmp_path_factory: pytest.TempPathFactory, method: str) -> None:
    workdir = run_method(tmp_path_factory, method)
    first, checkpoint = (torch.load(workdir / f"results/rounds/{r}/checkpoint.pt", weights_only=True) for r in (1, 2))
    assert checkpoint["provenance"]["method"] == method
    metrics = pd.read_csv(workdir / "results/rounds/2/train/metrics.tsv", sep="\t")
    summary = pd.read_csv(workdir / "results/summary.tsv", sep="\t")
    figures = sorted(path.name for path in (workdir / "results/rounds/2/figures").iterdir())
    clustering = ["cluster_sizes.png", "clusters.png", "nmi.png"]  # the report's: none without clusters
    assert figures == sorted(["training.png", *([] if method != "deepcluster" else clustering)])
    assert metrics["epoch"].unique().tolist() == [0]  # one epoch per round: .test's
    if method == "rotnet":  # rotations only: no clustering stage ran at all
        assert not (workdir / "results/rounds/1/features").exists()
        assert checkpoint["targets"]["super_classes"] == 4 and metrics["loss_sub"].isna().all()
        assert "nmi_label" not in summary
    elif method == "supervised":  # the true classes, one head over them, carried from round to round
        labels = pd.read_parquet(workdir / "results/true_labels.parquet")
        manifest = pd.read_parquet(workdir / "results/data/manifest.parquet")
        assert labels["sub_cluster"].tolist() == pd.Categorical(manifest["label"]).codes.tolist()
        assert checkpoint["targets"]["sub_classes"] == (10,) and metrics["loss_super"].isna().all()
        assert not (workdir / "results/rounds/1/features").exists()
    else:  # one head over the k clusters of the single super-cluster, no rotation, re-clustered every epoch
        rounds = [pd.read_parquet(workdir / f"results/rounds/{r}/labels.parquet") for r in (1, 2)]
        assert set(rounds[1]["super_cluster"]) == {0} and rounds[1]["sub_cluster"].nunique() == 4
        assert not rounds[0]["sub_cluster"].equals(rounds[1]["sub_cluster"])  # new labels after each epoch
        assert checkpoint["targets"]["sub_classes"] == (4,) and metrics["loss_super"].isna().all()
        assert summary["nmi_label"].notna().all()
        with h5py.File(workdir / "results/rounds/2/pca.h5") as f:  # 1/16 of the 256 directions, whitened
            assert f["projection"].shape == (256, 16)
    if method != "deepcluster":  # the head carried over: round 2's first step started from round 1's head
        assert checkpoint["provenance"]["previous_sha256"] == sha256(workdir / "results/rounds/1/checkpoint.pt")
        assert first["heads"].keys() == checkpoint["heads"].keys()


def test_an_unknown_config_key_is_rejected_with_its_name(tmp_path: Path) -> None:
    run = snakemake(tmp_path, "-n", kmeans={"superclusters": 4})
    assert run.returncode != 0
    assert "unknown key(s) superclusters in kmeans" in run.stderr + run.stdout
