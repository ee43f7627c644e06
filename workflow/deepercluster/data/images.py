"""Images as every stage reads them: decoded to 8-bit RGB whatever their mode, and the transforms of the
papers (a deterministic centre crop for features, a random resized crop and flip for training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from deepercluster.data.tars import TarReader
from deepercluster.errors import UnreadableImageError
from deepercluster.formats.manifest import LOCATION

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that keeps both sides at least this long.
DRAFT_SIDE = 1024
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # greyscale of 16- and 32-bit integers, 32-bit floats


def grey_range(image: Image.Image, grey: np.ndarray) -> tuple[float, float]:
    """The values black and white stand for in a wide greyscale image's samples ``grey``: its integer type's
    range from 0 (16 bits: 65535; a TIFF's 32-bit or signed integers: their largest), or for floats [0, 1] when
    they lie in it, else their own range."""
    if image.mode == "F":
        finite = grey[np.isfinite(grey)]
        if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1):
            return 0.0, 1.0
        return float(finite.min()), float(finite.max())
    tags = getattr(image, "tag_v2", {})  # mode I: a TIFF says its samples' width and sign; PGMs and PNGs are 16-bit
    bits, signed = (tags.get(258, (16,))[0], tags.get(339, (1,))[0] == 2) if image.mode == "I" else (16, False)
    return 0.0, float(2 ** (bits - signed) - 1)


def eight_bit(grey: np.ndarray, black: float, white: float) -> np.ndarray:
    """``grey`` from [``black``, ``white``] to [0, 255], rounded, clipped; NaN is black."""
    scaled = (grey.astype(np.float64) - black) / ((white - black) or 1.0)
    return np.rint(np.nan_to_num(scaled, nan=0.0).clip(0, 1) * 255).astype(np.uint8)


def read_rgb(path: str | BinaryIO) -> Image.Image:
    """Open and fully decode an image (a file, or its bytes) as 8-bit RGB, whatever its mode.

    Wide greyscale (16- and 32-bit integers, floats) is scaled to 8 bits by ``grey_range`` (PIL's convert would
    clip integers at 255 and floats at 1, or truncate floats to 0); alpha is dropped; CMYK, palette and 1-bit
    images go through PIL's conversion. A large JPEG is decoded at a reduced scale with both sides at least
    ``DRAFT_SIDE``, so its memory stays bounded.
    """
    with Image.open(path) as image:
        image.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))
        if image.mode in WIDE_GREY:
            grey = np.asarray(image)
            image = Image.fromarray(eight_bit(grey, *grey_range(image, grey)))
        return image.convert("RGB")


class ImageDataset(Dataset):
    """(transform(RGB image), id) for the rows ``images`` of a manifest: ``id``, ``path`` and, for an image in a
    tar, where its bytes are (``tars.LOCATION``), read with one positioned read."""

    def __init__(self, images: pd.DataFrame, transform: Callable) -> None:
        self.paths = images["path"].tolist()
        self.ids = images["id"].to_numpy(np.int64)
        in_tars = set(LOCATION) <= set(images.columns)
        self.location = images[list(LOCATION)].to_numpy(np.float64) if in_tars else None
        self.tars = TarReader()
        self.transform = transform

    @classmethod
    def of_files(cls, paths: Sequence[str], transform: Callable) -> ImageDataset:
        """The image files ``paths``, with ids 0..N-1."""
        return cls(pd.DataFrame({"id": np.arange(len(paths)), "path": list(paths)}), transform)

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, i: int) -> str | BinaryIO:
        """Image ``i``'s file, or its bytes read from its tar."""
        if not self.in_tar(i):
            return self.paths[i]
        offset, size, tar_size, tar_mtime = self.location[i].tolist()
        return self.tars.read(self.paths[i], int(offset), int(size), int(tar_size), tar_mtime)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = read_rgb(self.source(i))
        except READ_ERRORS as error:
            raise UnreadableImageError(
                f"cannot read image {self.paths[i]}{self.member(i)} ({type(error).__name__}: {error}); the image "
                "was readable when results/data/manifest.parquet was built; restore it, or delete the manifest "
                "and rerun to skip it"
            ) from error
        return self.transform(image), int(self.ids[i])

    def in_tar(self, i: int) -> bool:
        return self.location is not None and not np.isnan(self.location[i, 0])

    def member(self, i: int) -> str:
        """Where in its tar image ``i`` is (empty for an image file)."""
        if not self.in_tar(i):
            return ""
        offset, size = self.location[i, :2].astype(np.int64)
        return f" (bytes {offset} to {offset + size})"


def feature_transform(image_size: int) -> Callable:
    """Deterministic: resize to 256/224 of the size, center-crop, normalise as ImageNet."""
    from torchvision import transforms  # here, not above: a stage that builds no transform skips its ~2 s import

    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(image_size: int, min_crop_scale: float = 0.08) -> Callable:
    """Augmenting: random resized crop (of ``min_crop_scale`` to all of the image's area, torchvision's and the
    papers' 0.08 by default) and horizontal flip, normalised as ImageNet."""
    from torchvision import transforms  # here, as in feature_transform

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
