"""The summary row of a round, from the files its rule declares: empty clusters are counted, not lost."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from deepercluster.cluster.labels import make_labels
from deepercluster.cluster.levels import cluster_sub, cluster_super
from deepercluster.formats.metrics import COLUMNS
from deepercluster.report.summary import summarize
from defaults import kmeans_settings


def empty_one_sub_cluster(path: str, emptied: int, into: int) -> int:
    """Move every member of sub-cluster ``emptied`` into ``into``, as a k-means that left it empty writes it."""
    with h5py.File(path, "r+") as f:
        assignments, sizes = f["assignments"][:], f["sizes"][:]
        moved = int(sizes[emptied])
        assignments[assignments == emptied] = into
        sizes[into], sizes[emptied] = sizes[into] + moved, 0
        f["assignments"][...], f["sizes"][...] = assignments, sizes
    return moved


def test_an_empty_sub_cluster_is_listed_with_size_zero_and_counted_by_the_summary(real_data, tmp_path: Path) -> None:
    common = {"shards": real_data.shards, "pca": real_data.pca, **kmeans_settings(iterations=3, seed=0)}
    super_file = str(tmp_path / "super.h5")
    cluster_super(out=super_file, super_clusters=2, **common)
    sub_files = [str(tmp_path / f"sub-{s}.h5") for s in range(2)]
    for s, path in enumerate(sub_files):
        cluster_sub(super_file=super_file, super_cluster=s, out=path, sub_clusters=4, **common)
    assert empty_one_sub_cluster(sub_files[1], emptied=2, into=0) > 0

    files = {name: str(tmp_path / name) for name in ("labels.parquet", "cluster_sizes.tsv", "nmi.json")}
    make_labels(
        manifest=real_data.manifest,
        super_file=super_file,
        sub_files=sub_files,
        out=files["labels.parquet"],
        sizes=files["cluster_sizes.tsv"],
        nmi_out=files["nmi.json"],
    )
    sizes = pd.read_csv(files["cluster_sizes.tsv"], sep="\t").set_index(["super_cluster", "sub_cluster"])["size"]
    assert len(sizes) == 8 and sizes.sum() == 600
    assert sizes.loc[(1, 2)] == 0 and (sizes.drop((1, 2)) > 0).all()

    metrics = tmp_path / "metrics.tsv"
    rows = [
        {"round": 1, "epoch": e, "iteration": i, "loss": 2.0 - i / 10} for e in (0, 1) for i in range(2 * e, 2 * e + 2)
    ]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(metrics, sep="\t", index=False)
    benchmark = tmp_path / "benchmarks/rounds/1/clusters/sub-0.tsv"
    benchmark.parent.mkdir(parents=True)
    benchmark.write_text("s\th:m:s\n2.5\t0:00:02\n")
    out = tmp_path / "summary.tsv"
    summarize(
        metrics=[str(metrics)],
        nmi=[files["nmi.json"]],
        sizes=[files["cluster_sizes.tsv"]],
        benchmarks={"1": {"sub_clusters": [str(benchmark)]}},
        out=str(out),
    )
    row = pd.read_csv(out, sep="\t").iloc[0]
    assert row["round"] == 1 and row["clusters"] == 8 and row["empty_clusters"] == 1 and row["size_min"] == 0
    assert row["nmi_label"] == pytest.approx(json.loads(Path(files["nmi.json"]).read_text())["label"], rel=1e-3)
    assert np.isclose(row["final_loss"], np.mean([1.8, 1.7])) and row["seconds_sub_clusters"] == 2.5
