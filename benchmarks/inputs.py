"""The benchmarks' inputs, made by the package's own stages: synthetic feature shards, real Fashion-MNIST images;
and JPEGs of real photographs, and rows held in memory as k-means reads them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from deepercluster.checkpoints import initial_checkpoint
from deepercluster.cluster.pca import fit_pca
from deepercluster.config import validate_config
from deepercluster.data.manifest import build_manifest
from deepercluster.files import sha256
from deepercluster.formats.features import write_shard
from deepercluster.formats.labels import Labels, write_labels

IMAGE_SIZE = 32
# scikit-image's colour photographs (its wheel ships them): a person, a cat, a cup, a street, a rocket, a galaxy
# field, a retina and a stained tissue, 300 to 1,411 px a side.
PHOTOGRAPHS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)

# The schema's defaults, every stage setting the benchmarks do not choose themselves.
DEFAULTS = validate_config({})


def synthetic_checkpoint(shards: list[str]) -> str:
    """The stand-in for the checkpoint whose features ``synthetic_shards`` says its shards hold, beside them."""
    return str(Path(shards[0]).with_name("checkpoint.pt"))


def synthetic_shards(folder: Path, rows: int, dim: int, shard_rows: int, seed: int = 0) -> list[str]:
    """``rows`` float32 rows of a 64-centre Gaussian mixture in ``dim`` dimensions, as feature shards (of the
    stand-in checkpoint ``synthetic_checkpoint``)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt"
    checkpoint.write_bytes(b"a stand-in for the checkpoint the synthetic rows come from")
    paths = []
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        x = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.5, size=(n, dim)).astype(np.float32)
        paths.append(str(folder / f"shard-{len(paths)}.h5"))
        write_shard(paths[-1], x, np.arange(start, start + n), checkpoint_sha256=sha256(checkpoint))
    return paths


class Rows:
    """A ``FeatureSource`` over rows held in memory, in chunks of the shard source's size."""

    def __init__(self, x: np.ndarray, chunk_rows: int = 16384) -> None:
        self.x, self.chunk_rows = x, chunk_rows
        self.count, self.dim = x.shape
        self.ids = np.arange(self.count)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.count, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.count)
            yield self.ids[start:stop], self.x[start:stop]


def whitening_file(shards: list[str], out: Path, sample_size: int) -> str:
    """The PCA stage's ``pca.h5`` over ``shards`` (all directions kept, as DeeperCluster does)."""
    pca = DEFAULTS["pca"]
    fit_pca(
        shards=shards,
        checkpoint=synthetic_checkpoint(shards),
        out=str(out),
        dim=None,
        fraction=DEFAULTS["methods"]["deepercluster"]["pca_fraction"],
        sample_size=sample_size,
        seed=0,
        eigenvalue_floor=pca["eigenvalue_floor"],
    )
    return str(out)


@dataclass(frozen=True)
class ImageRound:
    """Real Fashion-MNIST images through the manifest and init stages, and labels from their true classes."""

    manifest: str
    checkpoint: str
    labels: str
    paths: list[str]
    ids: list[int]
    arch: str

    def frame(self) -> pd.DataFrame:
        """The images as manifest rows (id, path)."""
        return pd.DataFrame({"id": self.ids, "path": self.paths})


def image_round(folder: Path, images: int, arch: str = "small_convnet") -> ImageRound:
    """``images`` Fashion-MNIST images, a random ``arch``, labels 2 super-clusters x 5 sub-clusters."""
    manifest, checkpoint = str(folder / "manifest.parquet"), str(folder / "checkpoint.pt")
    build_manifest(
        source="fashion-mnist",
        path=str(folder / "fashion-mnist"),
        manifest=manifest,
        skipped=str(folder / "skipped.tsv"),
        max_images=images,
        seed=0,
        label_from_folder=True,
        path_column="path",
        split=None,
        uncurated=None,
        verify_images="none",
        workers=0,
    )
    initial_checkpoint(arch=arch, sobel=True, seed=0, out=checkpoint)
    frame = pd.read_parquet(manifest)
    classes = frame["label"].astype("category").cat.codes.to_numpy().astype(np.int64)
    labels = str(folder / "labels.parquet")
    table = pd.DataFrame({"id": frame["id"], "super_cluster": classes % 2, "sub_cluster": classes // 2})
    write_labels(labels, Labels(table, [5, 5]))
    return ImageRound(manifest, checkpoint, labels, frame["path"].tolist(), frame["id"].tolist(), arch)


def photographs(folder: Path, count: int, sides: tuple[int, int], seed: int = 0) -> list[str]:
    """``count`` JPEGs of the ``PHOTOGRAPHS`` in turn, written in ``folder`` as cameras and crawls store photos
    (quality 90, chroma at half resolution), each resized (Lanczos) to a long side drawn uniformly from ``sides``."""
    from skimage import data  # here: only the JPEG benchmarks and tests need it (the extra test)

    originals = [Image.open(Path(data.__file__).parent / name).convert("RGB") for name in PHOTOGRAPHS]
    rng, paths = np.random.default_rng(seed), []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = originals[i % len(originals)]
        scale = rng.integers(sides[0], sides[1] + 1) / max(photo.size)
        paths.append(str(folder / f"{i}.jpg"))
        photo.resize([round(side * scale) for side in photo.size], Image.LANCZOS).save(paths[-1], quality=90)
    return paths
