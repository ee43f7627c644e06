"""The manifest stage: one row per readable image of a data source (a folder, a table, Fashion-MNIST).

The manifest is the only list of images every later stage reads; an image unreadable when it is built is
left out and listed in ``skipped.tsv``.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from deepercluster.data.images import READ_ERRORS, read_rgb
from deepercluster.errors import DataError
from deepercluster.files import atomic_output
from deepercluster.formats.manifest import read_manifest, write_manifest, write_skipped
from deepercluster.logs import progress

logger = logging.getLogger(__name__)

SOURCES = ("folder", "table", "fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLE_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": pd.read_csv,
    ".tsv": functools.partial(pd.read_csv, sep="\t"),
    ".txt": functools.partial(pd.read_csv, sep="\t"),
    ".parquet": pd.read_parquet,
}
FASHION_MNIST_IDX = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
VERIFY_BATCH = 64


def build_manifest(
    *,
    source: str,
    path: str,
    manifest: str,
    skipped: str,
    max_images: int | None,
    seed: int,
    label_from_folder: bool,
    path_column: str,
    split: str | None,
    verify_images: bool,
    workers: int,
) -> None:
    """Stage 'manifest': one row per readable image.

    ``split`` keeps only the images whose ``split`` metadata column has that value (Fashion-MNIST's
    train or test split, a table's split column); images without that column are all kept.
    """
    if source not in SOURCES:
        raise DataError(f"data.source is {source!r}; set it to one of {', '.join(SOURCES)}")
    if max_images is not None and max_images < 1:
        raise DataError(f"data.max_images is {max_images}; set it to a positive number, or null for all images")
    root = Path(os.path.abspath(path))
    if source != "fashion-mnist" and not root.exists():
        raise DataError(f"{root} does not exist; set data.path in the config to your images")
    frame, pixels, looked_for = _candidates(source, root, label_from_folder, path_column, split)
    found = len(frame)
    keep = _subsample(found, max_images, seed)
    frame = frame.iloc[keep].reset_index(drop=True)
    if pixels is not None:
        _write_pngs(frame["path"].tolist(), pixels[keep])
    errors = _missing(frame["path"].tolist())
    if verify_images:
        errors.update(_unreadable(frame.loc[~frame["path"].isin(errors), "path"].tolist(), workers))
    write_skipped(skipped, errors)
    if errors:
        logger.warning("%d unreadable images skipped; they are listed in %s", len(errors), skipped)
    frame = frame[~frame["path"].isin(errors)].reset_index(drop=True)
    logger.info(
        "%s: %d images found, %d kept (max_images=%s), %d skipped as unreadable",
        root,
        found,
        len(frame),
        max_images,
        len(errors),
    )
    if frame.empty:
        some = f"; {len(errors)} unreadable, e.g. {next(iter(errors))}, listed in {skipped}" if errors else ""
        raise DataError(f"no readable images in {root} (looked for {looked_for}{some}); fix data.path or data.source")
    frame.insert(0, "id", np.arange(len(frame), dtype=np.int64))
    write_manifest(manifest, frame)


def _candidates(
    source: str, root: Path, label_from_folder: bool, path_column: str, split: str | None
) -> tuple[pd.DataFrame, np.ndarray | None, str]:
    """The source's images in ``split`` (all of them where they have no split column): (their table, the pixels of
    Fashion-MNIST's images still to be written or None, what was looked for)."""
    pixels = None
    if source == "folder":
        frame, looked_for = _folder_candidates(root, label_from_folder)
    elif source == "table":
        frame, looked_for = _table_candidates(root, path_column)
    else:
        frame, pixels = _fashion_mnist_candidates(root)
        looked_for = "Fashion-MNIST"
    if split is not None and "split" in frame.columns:
        in_split = np.flatnonzero((frame["split"] == split).to_numpy())
        logger.info("split %r: %d of %d images", split, len(in_split), len(frame))
        frame, pixels = frame.iloc[in_split].reset_index(drop=True), None if pixels is None else pixels[in_split]
    elif split is not None:
        logger.info("the images have no split column: split %r keeps them all", split)
    return frame, pixels, looked_for


def join_evaluation(*, train: str, test: str, out: str) -> None:
    """Stage 'eval-manifest': the evaluation images, the ``train`` manifest's (what the linear probes learn from
    and the k-NN remembers) then the ``test`` manifest's (what every evaluation scores), in one manifest with the
    column ``eval_split`` (train or test) and new ids 0..N-1."""
    parts = {"train": read_manifest(train), "test": read_manifest(test)}
    frame = pd.concat([part.assign(eval_split=role) for role, part in parts.items()], ignore_index=True)
    frame["id"] = np.arange(len(frame), dtype=np.int64)
    logger.info("evaluation images: %d train (%s), %d test (%s)", len(parts["train"]), train, len(parts["test"]), test)
    write_manifest(out, frame)


def _folder_candidates(root: Path, label_from_folder: bool) -> tuple[pd.DataFrame, str]:
    """Image files under ``root``, sorted; the label is the first subfolder's name."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    frame = pd.DataFrame({"path": [str(p) for p in files]})
    if label_from_folder:
        parts = [p.relative_to(root).parts for p in files]
        frame["label"] = pd.array([q[0] if len(q) > 1 else pd.NA for q in parts], dtype="string")
    return frame, f"files ending in {', '.join(IMAGE_EXTENSIONS)}"


def _table_candidates(table: Path, path_column: str) -> tuple[pd.DataFrame, str]:
    """Rows of a CSV, TSV or parquet table; image paths are relative to the table's folder."""
    reader = TABLE_READERS.get(table.suffix.lower())
    if reader is None:
        raise DataError(
            f"{table} is not a table; set data.path to a {', '.join(TABLE_READERS)} file for data.source 'table'"
        )
    frame = reader(table)
    if path_column not in frame.columns:
        raise DataError(
            f"{table} has no column {path_column!r} (it has {', '.join(map(str, frame.columns))}); "
            "set data.path_column to the column of image paths"
        )
    paths = pd.Series([os.path.abspath(os.path.join(table.parent, str(p))) for p in frame.pop(path_column)])
    repeated = paths[paths.duplicated(keep=False)]
    if not repeated.empty:
        first = repeated.iloc[0]
        rows = (repeated.index[repeated == first] + 1).tolist()
        raise DataError(
            f"{table} lists {first} {len(rows)} times (rows {', '.join(map(str, rows))}; {repeated.nunique()} "
            "paths are repeated): a repeated image weighs twice in the clustering; keep one row per image"
        )
    frame = frame.rename(columns={"id": "source_id", "path": "source_path"})
    frame.insert(0, "path", paths.tolist())
    return frame, f"image paths in column {path_column!r}"


def _fashion_mnist_candidates(root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Fashion-MNIST's 70000 images as rows ``{root}/{split}/{class}/{index:05d}.png`` and their pixels."""
    splits = _load_fashion_mnist(root)
    rows = [
        (str(root / split / str(label) / f"{index:05d}.png"), FASHION_MNIST_CLASSES[label], split)
        for split, (_, labels) in splits.items()
        for index, label in enumerate(labels.tolist())
    ]
    pixels = np.concatenate([images for images, _ in splits.values()])
    return pd.DataFrame(rows, columns=["path", "label", "split"]), pixels


def _load_fashion_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images and labels per split, from Debian's dataset-fashion-mnist or else torchvision's download."""
    files = {
        split: (
            FASHION_MNIST_IDX / f"{prefix}-images-idx3-ubyte.gz",
            FASHION_MNIST_IDX / f"{prefix}-labels-idx1-ubyte.gz",
        )
        for split, prefix in FASHION_MNIST_SPLITS.items()
    }
    if all(p.exists() for pair in files.values() for p in pair):
        return {split: (_read_idx(images), _read_idx(labels)) for split, (images, labels) in files.items()}
    from torchvision.datasets import FashionMNIST  # here, not above: Debian's files need no torchvision (~2 s)

    try:
        sets = {s: FashionMNIST(root=root / "raw", train=s == "train", download=True) for s in FASHION_MNIST_SPLITS}
    except (OSError, RuntimeError) as error:
        raise DataError(
            f"Fashion-MNIST is not in {FASHION_MNIST_IDX} and torchvision could not download it ({error}); "
            "run 'apt-get install dataset-fashion-mnist', or give this machine network access"
        ) from error
    return {split: (d.data.numpy(), d.targets.numpy()) for split, d in sets.items()}


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped uint8 IDX array: magic 0x0000 0x08 ndim, big-endian uint32 dims, then the bytes."""
    broken = f"{path} is not a uint8 IDX file; run 'apt-get install --reinstall dataset-fashion-mnist'"
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3] if len(data) >= 4 else 0
    if data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * ndim:
        raise DataError(broken)
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise DataError(broken)
    return values.reshape(shape)


def _subsample(count: int, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``max_images`` of ``count`` rows, in their original order."""
    if max_images is None or max_images >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))


def _write_pngs(paths: Sequence[str], pixels: np.ndarray) -> None:
    """Write each greyscale image as a PNG, atomically; an existing file is kept."""
    written = 0
    for path, image in progress(zip(paths, pixels, strict=True), desc="write PNGs", total=len(paths), unit="img"):
        if not os.path.exists(path):
            with atomic_output(path) as partial:
                Image.fromarray(image).save(partial, format="PNG")
            written += 1
    logger.info("wrote %d PNGs, kept %d existing", written, len(paths) - written)


def _missing(paths: Sequence[str]) -> dict[str, str]:
    """'FileNotFoundError' for each path that is not a file (a table's rows may name any path)."""
    return {path: "FileNotFoundError: no such file" for path in paths if not os.path.isfile(path)}


class _ReadCheck(Dataset):
    """(path, error) per image; the error is empty when the image decodes."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, str]:
        try:
            read_rgb(self.paths[i])
        except READ_ERRORS as error:
            return self.paths[i], f"{type(error).__name__}: {error}"
        return self.paths[i], ""


def _unreadable(paths: Sequence[str], workers: int) -> dict[str, str]:
    """Decode every image in a DataLoader; return the error of each one that fails, by path."""
    loader = DataLoader(_ReadCheck(paths), batch_size=VERIFY_BATCH, num_workers=workers, collate_fn=list)
    errors: dict[str, str] = {}
    for batch in progress(loader, desc="verify images", total=len(loader), unit="batch"):
        errors.update((path, error) for path, error in batch if error)
    return errors
