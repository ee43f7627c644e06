"""Shared fixtures: real feature shards of Fashion-MNIST images, and an in-memory ``FeatureSource``.

The shards are built once per session by the package's own stages (manifest -> init ->
features -> pca) on 600 real Fashion-MNIST images, so every test of k-means, PCA and the
labels runs on the features a workflow run would give it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import deepercluster  # noqa: F401  its process defaults (__init__.py), before torch or faiss loads
from defaults import manifest_settings, pca_settings, shard_settings

IMAGES = 600  # Fashion-MNIST images in the manifest
SHARD_SIZE = 200  # -> 3 shards
IMAGE_SIZE = 32
FEATURE_DIM = 256  # small_convnet's feature


@dataclass(frozen=True)
class RealData:
    """The files of one real round 0: manifest, random-init checkpoint, feature shards, PCA."""

    root: Path
    manifest: str
    checkpoint: str
    shards: list[str]
    pca: str


@pytest.fixture(scope="session")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> RealData:
    """600 real Fashion-MNIST images through the manifest, init, features and pca stages."""
    from deepercluster.checkpoints import initial_checkpoint
    from deepercluster.cluster.pca import fit_pca
    from deepercluster.data.manifest import build_manifest
    from deepercluster.features import extract_features
    from deepercluster.plan import shard_count

    root = tmp_path_factory.mktemp("round0")
    manifest, checkpoint = str(root / "manifest.parquet"), str(root / "checkpoint.pt")
    build_manifest(
        source="fashion-mnist",
        path=str(root / "fashion-mnist"),
        manifest=manifest,
        skipped=str(root / "skipped.tsv"),
        **manifest_settings(max_images=IMAGES, split=None),  # both splits
    )
    initial_checkpoint(arch="small_convnet", sobel=True, seed=0, out=checkpoint)
    shards = []
    for shard in range(shard_count(IMAGES, SHARD_SIZE)):
        shards.append(str(root / f"shard-{shard}.h5"))
        extract_features(
            manifest=manifest,
            checkpoint=checkpoint,
            shard=shard,
            shard_size=SHARD_SIZE,
            out=shards[-1],
            **shard_settings(image_size=IMAGE_SIZE),
        )
    pca = str(root / "pca.h5")
    fit_pca(shards=shards, checkpoint=checkpoint, out=pca, **pca_settings(sample_size=100_000, seed=0))
    return RealData(root, manifest, checkpoint, shards, pca)


@pytest.fixture(scope="session")
def raw_features(real_data: RealData) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of every shard, concatenated in shard order, read with h5py directly."""
    import h5py

    ids, features = [], []
    for path in real_data.shards:
        with h5py.File(path, "r") as f:
            ids.append(f["ids"][:])
            features.append(f["features"][:])
    return np.concatenate(ids), np.concatenate(features)


@pytest.fixture(scope="session")
def whitened(real_data: RealData) -> tuple[np.ndarray, np.ndarray]:
    """(ids, PCA-whitened and L2-normalised features) of every shard, through ``ShardSource``."""
    from deepercluster.cluster.rows import ShardSource
    from deepercluster.formats.whitening import Whitening

    whitening = Whitening.load(real_data.pca)
    chunks = list(ShardSource(real_data.shards, whitening, whitening.dim).chunks())
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


class ArraySource:
    """A ``FeatureSource`` over in-memory rows, yielded ``chunk_rows`` at a time."""

    def __init__(self, ids: np.ndarray, x: np.ndarray, chunk_rows: int = 100) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.dim, self.count, self.chunk_rows = self.x.shape[1], len(self.ids), chunk_rows

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.count, self.chunk_rows):
            yield self.ids[start : start + self.chunk_rows], self.x[start : start + self.chunk_rows]


@pytest.fixture
def array_source() -> Callable[..., ArraySource]:
    """Factory of in-memory ``FeatureSource``s: ``array_source(ids, x, chunk_rows=100)``."""
    return ArraySource


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A world of one for stages that call ``init_distributed``, whatever launched pytest."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def class_labels(real_data: RealData, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A labels table for the real images made from their true classes: 2 super-clusters x 5 sub-clusters."""
    import pandas as pd

    from deepercluster.formats.labels import Labels, write_labels

    manifest = pd.read_parquet(real_data.manifest)
    classes = manifest["label"].astype("category").cat.codes.to_numpy()
    labels = tmp_path_factory.mktemp("class-labels") / "labels.parquet"
    table = pd.DataFrame({"id": manifest["id"], "super_cluster": classes % 2, "sub_cluster": classes // 2})
    write_labels(labels, Labels(table, [5, 5]))
    return str(labels)
