"""The manifest stage on real image files, and the datasets read from it."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from benchmarks.inputs import photographs
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from deepercluster.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    feature_transform,
    network_input,
    read_rgb,
    train_transform,
)
from deepercluster.data.manifest import FASHION_MNIST_CLASSES, SOURCES, build_manifest
from deepercluster.errors import DataError, UnreadableImageError
from deepercluster.formats.manifest import metadata_columns, read_manifest
from defaults import manifest_settings

IDX = Path("/usr/share/datasets/fashion-mnist")


def _image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> Path:
    """Write a real image (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _corrupt(path: Path) -> Path:
    """Write random bytes under an image name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return path


def _build(tmp_path: Path, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the manifest stage into tmp_path; return the manifest and the skipped table."""
    build_manifest(
        manifest=str(tmp_path / "manifest.parquet"),
        skipped=str(tmp_path / "skipped.tsv"),
        **manifest_settings(**{"max_images": None, "split": None, **kwargs}),
    )
    return read_manifest(str(tmp_path / "manifest.parquet")), pd.read_csv(tmp_path / "skipped.tsv", sep="\t")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Class folders (one nested deeper) with PNGs and JPEGs, one top-level image and one corrupt file."""
    root = tmp_path / "images"
    _image(root / "cat" / "a.png", (255, 0, 0))
    _image(root / "cat" / "deep" / "b.JPG", (0, 255, 0))
    _image(root / "dog" / "c.jpeg", (0, 0, 255))
    _image(root / "top.png", (9, 9, 9))
    _corrupt(root / "dog" / "broken.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_source(tmp_path: Path, folder: Path) -> None:
    frame, skipped = _build(tmp_path, source="folder", path=str(folder))
    assert frame["id"].tolist() == [0, 1, 2, 3]
    assert frame["id"].dtype == np.int64
    assert frame["path"].tolist() == [
        str(folder / "cat" / "a.png"),
        str(folder / "cat" / "deep" / "b.JPG"),
        str(folder / "dog" / "c.jpeg"),
        str(folder / "top.png"),
    ]
    assert frame["label"].iloc[:3].tolist() == ["cat", "cat", "dog"]
    assert pd.isna(frame["label"].iloc[3])
    assert metadata_columns(frame) == ["label"]
    assert skipped["path"].tolist() == [str(folder / "dog" / "broken.jpg")]
    assert skipped["error"].iloc[0]


def test_folder_without_labels(tmp_path: Path, folder: Path) -> None:
    frame, _ = _build(tmp_path, source="folder", path=str(folder), label_from_folder=False)
    assert list(frame.columns) == ["id", "path"]


def test_folder_unverified_and_subsampled(tmp_path: Path, folder: Path) -> None:
    frame, skipped = _build(tmp_path, source="folder", path=str(folder), verify_images="none", max_images=3, seed=1)
    assert len(frame) == 3 and skipped.empty and list(skipped.columns) == ["path", "error"]
    assert frame["path"].tolist() == sorted(frame["path"])
    again, _ = _build(tmp_path, source="folder", path=str(folder), verify_images="none", max_images=3, seed=1)
    assert again.equals(frame)


def test_no_readable_images(tmp_path: Path) -> None:
    _corrupt(tmp_path / "images" / "x.png")
    with pytest.raises(DataError, match=r"no readable images.*images"):
        _build(tmp_path, source="folder", path=str(tmp_path / "images"))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_table_source(tmp_path: Path, suffix: str) -> None:
    images = tmp_path / "photos"
    _image(images / "one.png", (1, 2, 3))
    _image(images / "two.jpg", (4, 5, 6))
    _corrupt(images / "three.png")
    _image(images / "four.png", (7, 8, 9))
    table = pd.DataFrame(
        {
            "id": [10, 11, 12, 13],
            "file": ["photos/one.png", "photos/two.jpg", "photos/three.png", str(images / "four.png")],
            "user": ["ann", "bob", "cy", "dee"],
            "tag": ["x", "y", "z", "w"],
        }
    )
    path = tmp_path / f"table{suffix}"
    if suffix == ".parquet":
        table.to_parquet(path)
    else:
        table.to_csv(path, sep="," if suffix == ".csv" else "\t", index=False)
    frame, skipped = _build(tmp_path, source="table", path=str(path), path_column="file", workers=2)
    assert list(frame.columns) == ["id", "path", "source_id", "user", "tag"]
    assert frame["id"].tolist() == [0, 1, 2]
    assert frame["path"].tolist() == [
        str(images / "one.png"),
        str(images / "two.jpg"),
        str(images / "four.png"),
    ]
    assert frame["user"].tolist() == ["ann", "bob", "dee"]
    assert frame["source_id"].tolist() == [10, 11, 13]
    assert skipped["path"].tolist() == [str(images / "three.png")]


def test_table_missing_column(tmp_path: Path) -> None:
    pd.DataFrame({"file": ["a.png"], "user": ["ann"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"t\.csv has no column 'path' \(it has file, user\)"):
        _build(tmp_path, source="table", path=str(tmp_path / "t.csv"))


def _idx_images(prefix: str) -> np.ndarray:
    """Fashion-MNIST pixels read independently of the module (16-byte header of idx3)."""
    with gzip.open(IDX / f"{prefix}-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)


@pytest.mark.skipif(not IDX.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist(tmp_path: Path) -> None:
    root = tmp_path / "fmnist"
    frame, skipped = _build(tmp_path, source="fashion-mnist", path=str(root), max_images=60, seed=3)
    assert len(frame) == 60 and skipped.empty
    assert sorted(map(str, root.rglob("*.png"))) == sorted(frame["path"])
    assert set(frame["label"]) <= set(FASHION_MNIST_CLASSES)
    assert set(frame["split"]) <= {"train", "test"}
    pixels = {"train": _idx_images("train"), "test": _idx_images("t10k")}
    for row in frame.iloc[[0, -1]].itertuples():
        path = Path(row.path)
        assert FASHION_MNIST_CLASSES[int(path.parent.name)] == row.label
        assert np.array_equal(np.asarray(Image.open(path)), pixels[row.split][int(path.stem)])

    again, _ = _build(tmp_path, source="fashion-mnist", path=str(root), max_images=60, seed=3)
    assert again.equals(frame)
    other, _ = _build(tmp_path, source="fashion-mnist", path=str(root), max_images=60, seed=4)
    assert set(other["path"]) != set(frame["path"])


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r", ".join(SOURCES)):
        _build(tmp_path, source="imagenet", path=str(tmp_path))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*data\.path"):
        _build(tmp_path, source="folder", path=str(tmp_path / "nowhere"))


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.parquet"):
        read_manifest(str(tmp_path / "absent.parquet"))
    _corrupt(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet"):
        read_manifest(str(tmp_path / "bad.parquet"))


def test_image_dataset(tmp_path: Path) -> None:
    good = _image(tmp_path / "good.png", (10, 20, 30), size=(40, 30))
    bad = _corrupt(tmp_path / "bad.jpg")
    dataset = ImageDataset(pd.DataFrame({"id": [7, 8], "path": [str(good), str(bad)]}), feature_transform(16))
    image, index = dataset[0]
    assert image.shape == (3, 16, 16) and index == 7
    with pytest.raises(UnreadableImageError, match=r"bad\.jpg.*delete the manifest"):
        dataset[1]


class Sources(Dataset):
    """Image ``i``'s source, what a DataLoader worker reads of an ``ImageDataset`` before decoding (an image file's
    path: no file is opened)."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> object:
        return self.images.source(i)


def private_dirty(_: object = None) -> int:
    """Bytes of this process's memory written since it was forked (or allocated): its private dirty pages."""
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Private_Dirty:"))


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's per-process memory")
def test_a_dataloader_worker_reading_every_path_copies_none_of_the_datasets_memory() -> None:
    """A DataLoader worker is a fork of the process holding the dataset, sharing its pages until it writes them.
    Reading an image's path must write none: a list of Python strings did (each read writes the string's
    reference count, so the worker copied every page of them: the training rank's paths again per worker, 113 B an
    image for ~55-character paths, measured at 1M images). Here the worker reads 200,000 paths of 44 characters in
    batches of 1,000, and its private memory, from after its first batch to after its last, grows by less than 8
    bytes an image (measured: 2.4-2.6 B, the worker's own allocations; with the list of strings, 98-99 B)."""
    n = 200_000
    paths = [f"/data/images/folder-{i // 1000:05d}/image-{i:08d}.png" for i in range(n)]
    dataset = ImageDataset.of_files(paths, np.asarray)
    batches = [[0]] + [range(start, min(n, start + 1000)) for start in range(0, n, 1000)]
    loader = DataLoader(
        Sources(dataset), batch_sampler=batches, num_workers=1, collate_fn=private_dirty, multiprocessing_context="fork"
    )
    written = list(loader)
    assert written[-1] - written[0] < 8 * n, f"{(written[-1] - written[0]) / n:.1f} B an image"


def test_transforms(tmp_path: Path) -> None:
    image = Image.new("RGB", (50, 37), (128, 64, 0))
    assert feature_transform(24)(image).shape == (3, 24, 24)
    assert train_transform(24)(image).shape == (3, 24, 24) and train_transform(24)(image).dtype == torch.uint8


def test_a_png_reaches_the_network_as_before(tmp_path: Path) -> None:
    """A PNG (no JPEG scaling) through the uint8 transforms and ``network_input`` gives what the transforms gave
    when they ended in torchvision's ToTensor and Normalize: the training transform bit for bit, the features'
    (its centre crop resampled alone) within one level of 255 at a few pixels: the 32-px demo sees the same."""
    from torchvision import transforms

    photos = photographs(tmp_path, 16, (28, 64))
    pngs = [
        Image.open(photo).save(Path(photo).with_suffix(".png")) or str(Path(photo).with_suffix(".png"))
        for photo in photos
    ]
    before = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    features_before = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(32), *before])
    train = train_transform(32)
    train_before = transforms.Compose([*train.steps.transforms[:-1], *before])
    levels = []
    for transform, then in ((feature_transform(32), features_before), (train, train_before)):
        torch.manual_seed(0)
        now = network_input(torch.stack([image for image, _ in ImageDataset.of_files(pngs, transform)]), "cpu")
        torch.manual_seed(0)
        then = torch.stack([then(Image.open(png).convert("RGB")) for png in pngs])
        levels.append((now - then).mul(torch.tensor(IMAGENET_STD).view(-1, 1, 1) * 255).abs())
    assert levels[1].max() == 0
    assert 0 < levels[0].max() < 1.001 and (levels[0] > 0.5).float().mean() < 0.01


def test_jpegs_decode_down_to_the_side_their_transform_needs(tmp_path: Path) -> None:
    """A camera-sized JPEG decodes to the most reduced scale whose short side still reaches the side asked (and
    never further down than ``DRAFT_SIDE``, the bound on its memory). For training, each crop decides: the crop
    the transform then draws from the decoded image has the network's 224 px a side, its photo decoded at 1/8,
    1/4 or 1/2; and a PNG's pixels and crops are those of the transform alone, the generator left as it was."""
    [photo] = photographs(tmp_path, 1, (2400, 2400))  # the astronaut, 2400 x 2400
    assert [read_rgb(photo, side).size for side in (256, 915, 5000)] == [(300, 300), (1200, 1200), (1200, 1200)]
    assert read_rgb(photo).size == (1200, 1200)
    train = train_transform(224)
    decoded, sides = set(), []
    for seed in range(200):
        torch.manual_seed(seed)
        image = read_rgb(photo, train.decode_side)
        decoded.add(image.size[0])
        sides.append(min(train.crop.get_params(image, train.crop.scale, train.crop.ratio)[2:]))
    assert decoded == {300, 600, 1200} and 224 <= min(sides) < 240
    png = tmp_path / "photo.png"
    Image.open(photo).resize((300, 300)).save(png)
    torch.manual_seed(0)
    ours = ImageDataset.of_files([str(png)], train)[0][0], torch.rand(1)
    torch.manual_seed(0)
    alone = train(Image.open(png).convert("RGB")), torch.rand(1)
    assert all(torch.equal(a, b) for a, b in zip(ours, alone, strict=True))


def test_the_features_scaled_decode_sees_what_a_full_decode_does_within_bounds(tmp_path: Path) -> None:
    """The features transform's pixels from a JPEG decoded down to 256 px (libjpeg's DCT scaling) against a full
    decode and torchvision's Resize and CenterCrop, on photographs as cameras and crawls store them. Measured: per photo
    the mean difference 0.5-7.1 levels of 255 (1.6 over camera-sized photos, 0.7 over small ones), the 99th
    percentile up to 52, the largest 152 (at sharp edges: a cup's rim, a motorcycle's chrome)."""
    from torchvision import transforms

    transform = feature_transform(224)
    full_decode = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    paths = photographs(tmp_path / "camera", 8, (2300, 2500)) + photographs(tmp_path / "small", 24, (160, 900))
    dataset = ImageDataset.of_files(paths, transform)
    means, tails = [], []
    for i, path in enumerate(paths):
        difference = (dataset[i][0].float() - full_decode(Image.open(path).convert("RGB")).float()).abs()
        means.append(float(difference.mean()))
        tails.append(float(difference.quantile(0.99)))
    assert max(means) <= 8 and np.mean(means[:8]) <= 2 and np.mean(means[8:]) <= 1.5
    assert max(tails) <= 56
    assert min(means) == 0  # the small photos under 512 px a side are not scaled: the same pixels


def grey_pixels(path: Path) -> list[list[int]]:
    """An image as the stages read it (8-bit RGB), as its one grey channel: R, G and B must be equal."""
    (pixels, _) = ImageDataset.of_files([str(path)], np.asarray)[0]
    assert pixels.dtype == np.uint8 and (pixels == pixels[..., :1]).all()
    return pixels[..., 0].tolist()


def test_float_and_32_bit_integer_images_are_scaled_not_zeroed_or_clipped(tmp_path: Path) -> None:
    """Real TIFFs of PIL's modes F and I: floats in [0, 1] by 255, other floats by their own range, 32-bit integers
    by int32's range; a 16-bit PGM (also mode I) keeps the 16-bit rule."""
    images = {
        "unit.tif": np.array([[0.0, 0.25], [0.5, 1.0]], np.float32),
        "wide.tif": np.array([[-2.0, 0.0], [6.0, np.nan]], np.float32),
        "int32.tif": np.array([[0, 2**30], [2**31 - 1, 70_000]], np.int32),
        "grey16.pgm": np.array([[0, 257], [32768, 65535]], np.int32),
    }
    for name, grey in images.items():
        Image.fromarray(grey).save(tmp_path / name)
    assert [Image.open(tmp_path / name).mode for name in images] == ["F", "F", "I", "I"]
    assert grey_pixels(tmp_path / "unit.tif") == [[0, 64], [128, 255]]
    assert grey_pixels(tmp_path / "wide.tif") == [[0, 64], [255, 0]]  # -2 -> 0, 6 -> 255; NaN is black
    assert grey_pixels(tmp_path / "int32.tif") == [[0, 128], [255, 0]]  # 70,000 of 2^31 - 1 is dark, not clipped
    assert grey_pixels(tmp_path / "grey16.pgm") == [[0, 1], [128, 255]]
