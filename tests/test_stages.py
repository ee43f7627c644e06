"""The stages on real Fashion-MNIST data: shards, two-level labels and NMI, the CLI, the models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from deepercluster.checkpoints import load_model
from deepercluster.cluster.labels import make_labels
from deepercluster.cluster.levels import cluster_sub, cluster_super
from deepercluster.data.images import ImageDataset, feature_transform, network_input
from deepercluster.data.manifest import FASHION_MNIST_CLASSES
from deepercluster.errors import DataError
from deepercluster.formats.clusters import read_clusters
from deepercluster.formats.features import read_chunks
from deepercluster.formats.manifest import read_manifest
from deepercluster.nn.models import build_model
from defaults import kmeans_settings, shard_settings

pytestmark = pytest.mark.usefixtures("single_process")


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_shards_hold_every_id_once(real_data, raw_features) -> None:
    manifest = read_manifest(real_data.manifest)
    assert manifest["id"].tolist() == list(range(600))
    assert set(manifest["label"]) <= set(FASHION_MNIST_CLASSES)
    ids, features = raw_features
    assert np.array_equal(ids, manifest["id"].to_numpy())
    checkpoint_sha = _sha256(real_data.checkpoint)
    for shard, path in enumerate(real_data.shards):
        with h5py.File(path, "r") as f:
            assert f["features"].shape == (200, 256) and f["features"].dtype == np.float32
            assert f["ids"].dtype == np.int64
            assert np.array_equal(f["ids"][:], np.arange(200 * shard, 200 * (shard + 1)))
            assert f.attrs["checkpoint_sha256"] == checkpoint_sha
            assert f.attrs["shard"] == shard
    assert np.isfinite(features).all()
    # Each row is the feature of the image with its id: recompute a few from the images.
    model, _ = load_model(real_data.checkpoint)
    dataset = ImageDataset(manifest, feature_transform(32))
    picked = [0, 199, 200, 457, 599]
    images = network_input(torch.stack([dataset[i][0] for i in picked]), torch.device("cpu"))
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    # (loose enough for shards extracted on a GPU, where cuDNN may use TF32)
    assert np.allclose(features[picked], expected, rtol=2e-3, atol=1e-4)
    assert not np.allclose(features[picked], features[picked[::-1]], rtol=2e-3, atol=1e-4)


def wreck_row_groups(path: Path, keep: set[int], spare: tuple[str, ...] = ()) -> None:
    """Overwrite with garbage the bytes of every parquet row group of ``path`` but those of ``keep`` (all of their
    columns but the ``spare`` ones)."""
    metadata = pq.ParquetFile(path).metadata
    names = metadata.schema.to_arrow_schema().names
    with open(path, "r+b") as f:
        for group in set(range(metadata.num_row_groups)) - keep:
            for column in (c for c in range(metadata.num_columns) if names[c] not in spare):
                chunk = metadata.row_group(group).column(column)
                first = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
                f.seek(first)
                f.write(b"\xff" * chunk.total_compressed_size)


def test_a_features_job_reads_only_its_shards_row_groups(real_data, tmp_path: Path, monkeypatch) -> None:
    """The manifest in row groups of 100 images; every row group but shard 1's (images 200-399) made unreadable:
    shard 1 is extracted as from the whole manifest, and reading the whole manifest fails."""
    from deepercluster.features import extract_features
    from deepercluster.formats import manifest as manifest_format

    monkeypatch.setattr(manifest_format, "ROW_GROUP", 100)
    manifest = tmp_path / "manifest.parquet"
    manifest_format.write_manifest(manifest, read_manifest(real_data.manifest))
    assert pq.ParquetFile(manifest).num_row_groups == 6
    wreck_row_groups(manifest, keep={2, 3})
    with pytest.raises(DataError, match=r"manifest\.parquet is not a readable parquet file"):
        read_manifest(str(manifest))
    out = tmp_path / "shard-1.h5"
    extract_features(
        manifest=str(manifest),
        checkpoint=real_data.checkpoint,
        shard=1,
        out=str(out),
        **shard_settings(shard_size=200, image_size=32),
    )
    with h5py.File(out, "r") as ours, h5py.File(real_data.shards[1], "r") as whole:
        assert np.array_equal(ours["ids"][:], np.arange(200, 400))
        assert np.array_equal(ours["features"][:], whole["features"][:])


def test_a_pools_class_sizes_are_counted_from_its_label_column_alone(real_data, tmp_path: Path, monkeypatch) -> None:
    """The manifest in 6 row groups, every column but the label's wrecked in all of them: the class sizes (what
    ``paired --pool`` ranks head and tail classes by) are still counted, as over the whole table, and read a group
    at a time; a column the manifest lacks is named with the ones it has."""
    from deepercluster.formats import manifest as manifest_format

    monkeypatch.setattr(manifest_format, "ROW_GROUP", 100)
    manifest = tmp_path / "manifest.parquet"
    frame = read_manifest(real_data.manifest)
    manifest_format.write_manifest(manifest, frame)
    wreck_row_groups(manifest, keep=set(), spare=("label",))
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_manifest(str(manifest))
    counts = manifest_format.value_counts(str(manifest), "label")
    assert counts.sort_index().to_dict() == frame["label"].value_counts().sort_index().to_dict()
    assert len(counts) == 10 and counts.sum() == 600
    with pytest.raises(DataError, match=r"no column 'class'; name one of: id, path, label"):
        manifest_format.value_counts(str(manifest), "class")


def test_a_float16_shard_holds_the_float32_features_rounded_in_half_the_bytes(real_data, tmp_path: Path) -> None:
    """features.dtype float16: the shard's features are the float32 shard's rounded to float16, stored as such
    (half the bytes), and read back as float32 by the stages' readers."""
    from deepercluster.features import extract_features

    out = tmp_path / "shard-1.h5"
    extract_features(
        manifest=real_data.manifest,
        checkpoint=real_data.checkpoint,
        shard=1,
        out=str(out),
        **shard_settings(shard_size=200, image_size=32, dtype="float16"),
    )
    with h5py.File(out, "r") as half, h5py.File(real_data.shards[1], "r") as whole:
        assert half["features"].dtype == np.float16 and whole["features"].dtype == np.float32
        assert half["features"].id.get_storage_size() * 2 == whole["features"].id.get_storage_size()
        assert np.array_equal(half["features"][:], whole["features"][:].astype(np.float16))
    (ids, x), *_ = read_chunks([str(out)])
    assert x.dtype == np.float32 and np.array_equal(ids, np.arange(200, 400))


def test_labels_from_two_levels(real_data, tmp_path: Path) -> None:
    super_file = str(tmp_path / "super.h5")
    common = {"shards": real_data.shards, "pca": real_data.pca, **kmeans_settings(iterations=5, seed=0)}
    cluster_super(out=super_file, super_clusters=3, **common)
    sub_files = [str(tmp_path / f"sub-{s}.h5") for s in range(3)]
    for s, path in enumerate(sub_files):
        cluster_sub(super_file=super_file, super_cluster=s, out=path, sub_clusters=4, **common)

    outputs = {name: str(tmp_path / name) for name in ("labels.parquet", "sizes.tsv", "nmi.json")}
    make_labels(
        manifest=real_data.manifest,
        super_file=super_file,
        sub_files=sub_files,
        out=outputs["labels.parquet"],
        sizes=outputs["sizes.tsv"],
        nmi_out=outputs["nmi.json"],
    )
    labels = pd.read_parquet(outputs["labels.parquet"])
    assert list(labels.columns) == ["id", "super_cluster", "sub_cluster"]
    assert sorted(labels["id"]) == list(range(600)) and labels["id"].is_unique
    labels = labels.set_index("id").sort_index()
    assert np.array_equal(labels["super_cluster"].to_numpy(), read_clusters(super_file).assignments)
    assert labels["sub_cluster"].between(0, 3).all()
    for s, path in enumerate(sub_files):
        level2 = read_clusters(path)
        assert np.array_equal(level2.ids, labels.index[labels["super_cluster"] == s])
        assert np.array_equal(labels.loc[level2.ids, "sub_cluster"].to_numpy(), level2.assignments)

    sizes = pd.read_csv(outputs["sizes.tsv"], sep="\t")
    assert list(sizes.columns) == ["super_cluster", "sub_cluster", "size"]
    # One row per (super-cluster, sub-cluster) of m x k, in order, holding its count in the labels and its size
    # in the sub-cluster file.
    assert list(zip(sizes["super_cluster"], sizes["sub_cluster"], strict=True)) == [
        (s, c) for s in range(3) for c in range(4)
    ]
    counted = [
        int(((labels["super_cluster"] == s) & (labels["sub_cluster"] == c)).sum()) for s in range(3) for c in range(4)
    ]
    assert sizes["size"].tolist() == counted and sum(counted) == 600
    assert sizes["size"].tolist() == [size for path in sub_files for size in read_clusters(path).sizes]

    scores = json.loads(Path(outputs["nmi.json"]).read_text())
    assert set(scores) == {"label", "split", "previous_round"}
    assert scores["previous_round"] is None
    manifest = read_manifest(real_data.manifest).set_index("id").sort_index()
    pairs = labels["super_cluster"].astype(str) + "/" + labels["sub_cluster"].astype(str)
    expected = normalized_mutual_info_score(manifest["label"], pairs)
    assert scores["label"] == pytest.approx(expected, abs=1e-12)
    assert 0 < scores["label"] < 1

    again = {name: str(tmp_path / "again" / name) for name in outputs}
    make_labels(
        manifest=real_data.manifest,
        super_file=super_file,
        sub_files=sub_files,
        out=again["labels.parquet"],
        sizes=again["sizes.tsv"],
        nmi_out=again["nmi.json"],
        previous=outputs["labels.parquet"],
    )
    assert json.loads(Path(again["nmi.json"]).read_text())["previous_round"] == pytest.approx(1.0, abs=1e-12)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepercluster", *args], capture_output=True, text=True, timeout=120)


def test_cli_init_writes_checkpoint(real_data, tmp_path: Path) -> None:
    out = tmp_path / "init.pt"
    done = _cli("init", "--arch", "small_convnet", "--sobel", "--seed", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert (checkpoint["arch"], checkpoint["sobel"], checkpoint["round"]) == ("small_convnet", True, 0)
    # Seeded: the same weights as the fixture's checkpoint, built in this process with seed 0.
    reference = torch.load(real_data.checkpoint, map_location="cpu", weights_only=True)["model"]
    assert checkpoint["model"].keys() == reference.keys()
    assert all(torch.equal(checkpoint["model"][k], reference[k]) for k in reference)


def test_a_process_that_imports_the_package_waits_passively_and_asks_numpy_for_no_huge_pages() -> None:
    """Unless the environment says otherwise: the values it holds win."""
    probe = "import deepercluster, os, numpy._core.multiarray as m; print(os.environ['OMP_WAIT_POLICY'], m._get_madvise_hugepage())"  # noqa: E501
    names = ("OMP_WAIT_POLICY", "NUMPY_MADVISE_HUGEPAGE")
    environment = {key: value for key, value in os.environ.items() if key not in names}
    for printed, given in {"PASSIVE False": {}, "ACTIVE True": dict(zip(names, ("ACTIVE", "1"), strict=True))}.items():
        done = subprocess.run(
            [sys.executable, "-c", probe], env={**environment, **given}, capture_output=True, text=True
        )
        assert done.stdout.strip() == printed, done.stderr


def test_cli_missing_checkpoint_one_line_error(real_data, tmp_path: Path) -> None:
    missing, out = tmp_path / "nowhere" / "model.pt", tmp_path / "shard-0.h5"
    done = _cli(
        "features",
        *("--manifest", real_data.manifest, "--checkpoint", str(missing), "--shard", "0"),
        *("--shard-size", "200", "--image-size", "32", "--batch-size", "64", "--workers", "0", "--dtype", "float32"),
        *("--out", str(out)),
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(missing) in lines[0] and "does not exist" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("arch", "size", "dim"), [("small_convnet", 32, 256), ("alexnet_bn", 64, 4096), ("vgg16_bn", 64, 4096)]
)
def test_model_feature_shapes(arch: str, size: int, dim: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, sobel=True).eval()
    assert model.feature_dim == dim
    with torch.no_grad():
        features = model(torch.randn(2, 3, size, size))
    assert features.shape == (2, dim) and torch.isfinite(features).all()
    sobel = model.sobel
    assert sobel is not None and not any(p.requires_grad for p in sobel.parameters())
    first_conv = next(m for m in model.features if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 2


def test_sobel_is_frozen_edge_filter() -> None:
    torch.manual_seed(0)
    model = build_model("small_convnet", sobel=True)
    assert build_model("small_convnet", sobel=False).sobel is None
    # A horizontal ramp: grey value = column index, the same on all three channels.
    ramp = torch.arange(8.0).expand(1, 3, 8, 8).clone()
    edges = model.sobel(ramp)
    assert edges.shape == (1, 2, 8, 8)
    interior = edges[0, :, 1:-1, 1:-1]
    assert torch.allclose(interior[0], torch.full((6, 6), -8.0))  # d/dx of the ramp, 1-2-1 weighted
    assert torch.allclose(interior[1], torch.zeros(6, 6), atol=1e-6)  # no vertical change
    # Training reaches the convs behind it but never the Sobel weights.
    model.train()
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    assert all(p.grad is None for p in model.sobel.parameters())
    first_conv = next(m for m in model.features if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
