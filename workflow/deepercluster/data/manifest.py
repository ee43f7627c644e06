"""The manifest stage: one row per readable image of a data source (a folder, a table, tar shards, Fashion-MNIST).

The manifest is the only list of images every later stage reads; an image unreadable when it is built is
left out and listed in ``skipped.tsv``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import DataLoader

from deepercluster.data.images import READ_ERRORS, ImageDataset, read_rgb
from deepercluster.data.pools import NO_CLASS, uncurated_pool
from deepercluster.data.tars import duplicate_keys, index_tar, tar_paths
from deepercluster.errors import DataError, UnreadableImageError
from deepercluster.files import atomic_output, scratch_folder
from deepercluster.formats.manifest import (
    LOCATION,
    ROW_GROUP,
    manifest_writer,
    read_manifest,
    skipped_writer,
    write_manifest,
)
from deepercluster.ids import in_sorted
from deepercluster.logs import progress
from deepercluster.seeds import derived_seed

logger = logging.getLogger(__name__)

SOURCES = ("folder", "table", "fashion-mnist", "tar")
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
# Fashion-MNIST's candidates: the row of each image's pixels, to write the kept ones as PNGs (not a manifest column).
PIXEL_ROW = "pixel_row"
VERIFY_CHOICES = "all, none, or a number of images"


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
    uncurated: dict[str, float] | None,
    verify_images: str,
    workers: int,
) -> None:
    """Stage 'manifest': one row per readable image, in two streamed passes, so its memory is that of one row group
    (``ROW_GROUP`` rows) whatever N: the source's candidates into scratch files, then the kept ones (a seeded
    subsample of ``max_images``), checked, into the manifest.

    ``split`` keeps only the images whose ``split`` metadata column has that value (Fashion-MNIST's
    train or test split, a table's split column); images without that column are all kept. ``uncurated`` (source
    fashion-mnist) draws an uncurated pool of ``max_images`` from the split instead (``data.pools``).
    ``verify_images``: decode ``all`` the kept images, ``none``, or a seeded sample of that many; an image found
    unreadable is left out.
    """
    if source not in SOURCES:
        raise DataError(f"data.source is {source!r}; set it to one of {', '.join(SOURCES)}")
    if max_images is not None and max_images < 1:
        raise DataError(f"data.max_images is {max_images}; set it to a positive number, or null for all images")
    checks = verification(verify_images)
    root = Path(os.path.abspath(path))
    if source not in ("fashion-mnist", "tar") and not root.exists():
        raise DataError(f"{root} does not exist; set data.path in the config to your images")
    request = Source(source, root, label_from_folder, path_column, split, uncurated, max_images, seed, workers)
    with scratch_folder(manifest) as scratch:
        found = Candidates(scratch)
        looked_for = found.write(request)
        keep = _subsample(found.count, max_images, seed)
        chosen = found.count if keep is None else len(keep)
        checked = None if checks is None else _subsample(chosen, checks, derived_seed(seed, 1))
        kept, errors = write_kept(found, keep, checked, manifest, skipped, workers, root, looked_for)
    logger.info(
        "%s: %d images found, %d kept (max_images=%s), %d skipped as unreadable",
        root,
        found.count,
        kept,
        max_images,
        errors,
    )


def verification(verify_images: str) -> int | None:
    """How many images ``verify_images`` asks to decode: None for all, 0 for none, else that number."""
    words = {"all": None, "none": 0}
    if verify_images in words:
        return words[verify_images]
    if not verify_images.isdigit() or int(verify_images) < 1:
        raise DataError(f"data.verify_images is {verify_images!r}; set it to {VERIFY_CHOICES}")
    return int(verify_images)


@dataclass(frozen=True)
class Source:
    """What the manifest stage is asked to list: ``build_manifest``'s arguments of the same names."""

    source: str
    root: Path
    label_from_folder: bool
    path_column: str
    split: str | None
    uncurated: dict[str, float] | None
    max_images: int | None
    seed: int
    workers: int


class Candidates:
    """A source's images (split kept), written in chunks of ``ROW_GROUP`` rows to scratch parquet files: their
    number, their chunks in order, and one schema for them all; for images to write (Fashion-MNIST's), their
    pixels by ``PIXEL_ROW``; for images in tars, each chunk's keys hashed (8 bytes an image) as it is written."""

    def __init__(self, scratch: Path) -> None:
        self.scratch, self.files, self.count, self.pixels, self.key_hashes = scratch, [], 0, None, []

    def write(self, request: Source) -> str:
        """Write the candidates of ``request``; return what was looked for."""
        chunks, looked_for = self.source_chunks(request)
        split, seen = request.split, 0
        for chunk in rows_of(chunks, ROW_GROUP):
            seen += len(chunk)
            if split is not None and "split" in chunk.columns:
                chunk = chunk[chunk["split"] == split]
            self.files.append(self.scratch / f"{len(self.files):06d}.parquet")
            chunk.reset_index(drop=True).to_parquet(self.files[-1], index=False)
            self.count += len(chunk)
            if request.source == "tar":
                self.key_hashes.append(pd.util.hash_pandas_object(chunk["key"], index=False).to_numpy())
        if self.key_hashes:
            check_unique_keys(self)
        logger.info("%d images found, %d in split %r (all those without a split column)", seen, self.count, split)
        return looked_for

    def __iter__(self) -> Iterator[tuple[int, pd.DataFrame]]:
        """(index of its first row, rows) of each chunk."""
        start = 0
        for file in self.files:
            chunk = pd.read_parquet(file)
            yield start, chunk
            start += len(chunk)

    def source_chunks(self, request: Source) -> tuple[Iterator[pd.DataFrame], str]:
        """The candidate rows of ``request``, in frames of any size, and what was looked for."""
        root = request.root
        if request.source == "folder":
            return folder_chunks(root, request.label_from_folder), f"files ending in {', '.join(IMAGE_EXTENSIONS)}"
        if request.source == "tar":
            return tar_chunks(str(root), request.workers), f"image members ({', '.join(IMAGE_EXTENSIONS)}) of tars"
        if request.source == "table":
            return iter([_table_candidates(root, request.path_column)]), f"paths in column {request.path_column!r}"
        frame, self.pixels = fashion_mnist_candidates(request)
        return iter([frame]), "Fashion-MNIST"

    def schema(self) -> pa.Schema:
        """The columns of every chunk, each of the type that holds all of its chunks' values."""
        schemas = [pq.read_schema(f).remove_metadata() for f in self.files]
        return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])


def rows_of(chunks: Iterator[pd.DataFrame], size: int) -> Iterator[pd.DataFrame]:
    """The rows of ``chunks`` regrouped ``size`` at a time (the last group shorter)."""
    pending: list[pd.DataFrame] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        while held >= size:
            rows = pd.concat(pending, ignore_index=True)
            yield rows.iloc[:size]
            pending, held = [rows.iloc[size:]], held - size
    if held:
        yield pd.concat(pending, ignore_index=True)


def write_kept(
    found: Candidates,
    keep: np.ndarray | None,
    checked: np.ndarray | None,
    manifest: str,
    skipped: str,
    workers: int,
    root: Path,
    looked_for: str,
) -> tuple[int, int]:
    """Write the candidates ``keep`` (sorted indices; None: all) that are readable to ``manifest``, the others to
    ``skipped``; decode those ``checked`` (sorted indices into the kept ones; None: all). Return the (kept, skipped)
    counts."""
    errors, example = 0, ""
    columns = [f for f in found.schema() if f.name != PIXEL_ROW]
    with manifest_writer(manifest, pa.schema([("id", pa.int64()), *columns])) as write:
        with skipped_writer(skipped) as skip:
            for start, chunk in progress(found, "manifest", total=len(found.files), unit="chunk"):
                rows, failed = kept_rows(chunk, start, keep, checked, workers, found.pixels)
                for name, error in failed:
                    skip(name, error)
                    example = example or f", e.g. {name}"
                rows.insert(0, "id", np.arange(write.count, write.count + len(rows), dtype=np.int64))
                write(rows)
                errors += len(failed)
        if errors:
            logger.warning("%d unreadable images skipped; they are listed in %s", errors, skipped)
        if write.count == 0:  # raised here, the manifest is not written
            unreadable = f"; {errors} unreadable{example}, listed in {skipped}" if errors else ""
            raise DataError(
                f"no readable images in {root} (looked for {looked_for}{unreadable}); fix data.path or data.source"
            )
    return write.count, errors


def kept_rows(
    chunk: pd.DataFrame,
    start: int,
    keep: np.ndarray | None,
    checked: np.ndarray | None,
    workers: int,
    pixels: np.ndarray | None,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The rows of ``chunk`` (candidates ``start``, ...) that are kept and readable, and the (name, error) of those
    kept but unreadable; Fashion-MNIST's kept images written as PNGs first."""
    picked = np.arange(start, start + len(chunk)) if keep is None else keep[in_range(keep, start, len(chunk))]
    rows = chunk.iloc[picked - start].reset_index(drop=True)
    if PIXEL_ROW in rows.columns:
        _write_pngs(rows["path"].tolist(), pixels[rows.pop(PIXEL_ROW).to_numpy()])
    first = start if keep is None else int(np.searchsorted(keep, start))  # the kept ordinal of rows' first
    check = np.arange(len(rows)) if checked is None else checked[in_range(checked, first, len(rows))] - first
    failed = unreadable_rows(rows, check, workers)
    return rows.drop(index=list(failed)).reset_index(drop=True), list(failed.values())


def in_range(sorted_values: np.ndarray, start: int, count: int) -> np.ndarray:
    """A mask of the ``sorted_values`` in ``[start, start + count)``."""
    return (sorted_values >= start) & (sorted_values < start + count)


def join_evaluation(*, train: str, test: str, out: str) -> None:
    """Stage 'eval-manifest': the evaluation images, the ``train`` manifest's (what the linear probes learn from
    and the k-NN remembers) then the ``test`` manifest's (what every evaluation scores), in one manifest with the
    column ``eval_split`` (train or test) and new ids 0..N-1."""
    parts = {"train": read_manifest(train), "test": read_manifest(test)}
    frame = pd.concat([part.assign(eval_split=role) for role, part in parts.items()], ignore_index=True)
    frame["id"] = np.arange(len(frame), dtype=np.int64)
    logger.info("evaluation images: %d train (%s), %d test (%s)", len(parts["train"]), train, len(parts["test"]), test)
    write_manifest(out, frame)


def folder_chunks(root: Path, label_from_folder: bool) -> Iterator[pd.DataFrame]:
    """Image files under ``root`` in sorted order (a folder's files and subfolders sorted by name together), a
    folder's files at a time; the label is the first subfolder's name."""
    files: list[str] = []
    for file in sorted_walk(str(root)):
        files.append(file)
        if len(files) == ROW_GROUP:
            yield folder_rows(root, files, label_from_folder)
            files = []
    yield folder_rows(root, files, label_from_folder)


def sorted_walk(folder: str) -> Iterator[str]:
    """The image files under ``folder``, depth first, each folder's entries in name order."""
    with os.scandir(folder) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        if entry.is_dir():
            yield from sorted_walk(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            yield entry.path


def folder_rows(root: Path, files: list[str], label_from_folder: bool) -> pd.DataFrame:
    """The rows of image files under ``root``."""
    frame = pd.DataFrame({"path": pd.array(files, dtype="string")})
    if label_from_folder:
        parts = [os.path.relpath(f, root).split(os.sep) for f in files]
        frame["label"] = pd.array([q[0] if len(q) > 1 else pd.NA for q in parts], dtype="string")
    return frame


def tar_chunks(root: str, workers: int) -> Iterator[pd.DataFrame]:
    """The image members of the tars of ``data.path`` (a folder or a glob), a tar at a time, indexed by ``workers``
    processes."""
    tars = tar_paths(root)
    if not tars:
        raise DataError(f"no .tar files at {root}; set data.path to a folder or glob of tar shards")
    index = functools.partial(index_tar, image_extensions=IMAGE_EXTENSIONS)
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        indexes = pool.imap(index, tars) if pool is not None else map(index, tars)
        for tar, frame in zip(tars, progress(indexes, "index tars", total=len(tars), unit="tar"), strict=True):
            if frame.empty:
                raise DataError(
                    f"{tar} holds no image members ({', '.join(IMAGE_EXTENSIONS)}); move it out of "
                    "data.path, or add its images"
                )
            yield frame


def check_unique_keys(found: Candidates) -> None:
    """Stop if two tars hold the same key: from the keys' hashes, the chunks read again only for a repeated one."""
    every = np.sort(np.concatenate(found.key_hashes))
    repeated = np.unique(every[1:][every[1:] == every[:-1]])
    if len(repeated):
        rows = [chunk[in_sorted(h, repeated)] for h, (_, chunk) in zip(found.key_hashes, found, strict=True)]
        error = duplicate_keys(pd.concat(rows, ignore_index=True))
        if error is not None:
            raise error


def _table_candidates(table: Path, path_column: str) -> pd.DataFrame:
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
    return frame


def fashion_mnist_candidates(request: Source) -> tuple[pd.DataFrame, np.ndarray]:
    """Fashion-MNIST's 70000 images as rows ``{root}/{split}/{class}/{index:05d}.png`` (or the uncurated pool drawn
    from the split), each with its ``PIXEL_ROW`` in the pixels returned."""
    splits = _load_fashion_mnist(request.root)
    if request.uncurated is not None:
        return uncurated_candidates(request, splits)
    rows = [
        (str(request.root / split / str(label) / f"{index:05d}.png"), FASHION_MNIST_CLASSES[label], split)
        for split, (_, labels) in splits.items()
        for index, label in enumerate(labels.tolist())
    ]
    frame = pd.DataFrame(rows, columns=["path", "label", "split"])
    pixels = np.concatenate([images for images, _ in splits.values()])
    return frame.assign(**{PIXEL_ROW: np.arange(len(frame))}), pixels


def uncurated_candidates(
    request: Source, splits: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[pd.DataFrame, np.ndarray]:
    """The uncurated pool of ``max_images`` drawn from Fashion-MNIST's ``split``: an original keeps its file's path,
    a near-duplicate or a distractor is written under ``{root}/uncurated-{digest}/`` (its settings' digest)."""
    if request.max_images is None or request.split not in splits:
        raise DataError(
            "data.uncurated draws a pool of data.max_images images from one of Fashion-MNIST's splits "
            f"({', '.join(splits)}); set data.max_images and data.split (now {request.max_images}, {request.split})"
        )
    images, labels = splits[request.split]
    settings = {key: float(value) for key, value in sorted(request.uncurated.items())}
    try:
        rows, pixels = uncurated_pool(images, labels, request.max_images, settings, derived_seed(request.seed, 2))
    except ValueError as error:
        raise DataError(f"data.uncurated: {error}") from error
    digest = hashlib.sha256(repr((request.seed, request.max_images, settings)).encode()).hexdigest()[:8]
    pool, split = request.root / f"uncurated-{digest}", request.split
    rows["path"] = [
        str(request.root / split / str(label) / f"{original:05d}.png")
        if kind == "original"
        else str(pool / kind / f"{n:05d}.png")
        for n, (kind, original, label) in enumerate(zip(rows["kind"], rows["original"], rows["label"], strict=True))
    ]
    rows["label"] = [FASHION_MNIST_CLASSES[label] if label >= 0 else NO_CLASS for label in rows["label"]]
    frame = rows[["path", "label"]].assign(split=split, kind=rows["kind"], original=rows["original"])
    return frame.assign(**{PIXEL_ROW: np.arange(len(frame))}), pixels


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


def _subsample(count: int, max_images: int | None, seed: int) -> np.ndarray | None:
    """Indices of a seeded random subset of ``max_images`` of ``count`` rows, in their original order; None for
    all of them."""
    if max_images is None or max_images >= count:
        return None
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


def unreadable_rows(rows: pd.DataFrame, check: np.ndarray, workers: int) -> dict[int, tuple[str, str]]:
    """The rows that are no file (of those not in a tar), and those of the rows ``check`` that fail to decode:
    (name, error) by row."""
    failed = {}
    if not set(LOCATION) <= set(rows.columns):
        missing = [i for i, path in enumerate(rows["path"]) if not os.path.isfile(path)]
        failed = {i: (rows["path"].iloc[i], "FileNotFoundError: no such file") for i in missing}
    check = np.setdiff1d(check, list(failed))
    if len(check):
        failed.update(_undecodable(rows.iloc[check], check, workers))
    return dict(sorted(failed.items()))


class _ReadCheck(ImageDataset):
    """(row, name, error) per image; the error is empty when the image decodes."""

    def __init__(self, rows: pd.DataFrame, numbers: np.ndarray) -> None:
        super().__init__(rows.assign(id=numbers), transform=lambda image: image)
        self.names = (rows["path"] + ":" + rows["key"]).tolist() if "key" in rows.columns else self.paths

    def __getitem__(self, i: int) -> tuple[int, str, str]:
        try:
            read_rgb(self.source(i))
        except (*READ_ERRORS, UnreadableImageError) as error:
            return int(self.ids[i]), self.names[i], f"{type(error).__name__}: {error}"
        return int(self.ids[i]), self.names[i], ""


def _undecodable(rows: pd.DataFrame, numbers: np.ndarray, workers: int) -> dict[int, tuple[str, str]]:
    """Decode each of ``rows`` (row ``numbers``) in a DataLoader; the (name, error) of each that fails, by number."""
    loader = DataLoader(_ReadCheck(rows, numbers), batch_size=VERIFY_BATCH, num_workers=workers, collate_fn=list)
    checked = progress(loader, "verify images", total=len(loader), unit="batch")
    return {number: (name, error) for batch in checked for number, name, error in batch if error}
