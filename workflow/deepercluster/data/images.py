"""Images as every stage reads them: decoded to 8-bit RGB whatever their mode, and the transforms of the
papers (a deterministic centre crop for features, a random resized crop and flip for training).

A transform states the shortest side its image needs (``PhotoTransform.decode_side``; for training, the side
where its crop keeps the network's pixels) and a JPEG is decoded no larger than that (libjpeg's DCT scaling: most
of a large photo's decoding cost saved). It hands over uint8 pixels, which ``network_input`` normalises on the
batch, on the device: the one place every stage makes the network's input."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from deepercluster.data.tars import TarReader
from deepercluster.errors import UnreadableImageError
from deepercluster.formats.manifest import CODED_PATHS, LOCATION

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale when that keeps both sides at least as long as its transform needs,
# and never asked for longer sides than these: the side when none is stated, and the bound on a huge JPEG's memory.
DRAFT_SIDE = 1024
# RandomResizedCrop's range of aspect ratios (torchvision's and the papers'): its narrowest crop's short side is
# sqrt(area * 3/4).
CROP_RATIO = (3 / 4, 4 / 3)
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


def read_rgb(source: str | BinaryIO, side: int | Callable[[Image.Image], int] = DRAFT_SIDE) -> Image.Image:
    """Open and fully decode an image (a file, or its bytes) as 8-bit RGB, whatever its mode.

    Wide greyscale (16- and 32-bit integers, floats) is scaled to 8 bits by ``grey_range`` (PIL's convert would
    clip integers at 255 and floats at 1, or truncate floats to 0); alpha is dropped; CMYK, palette and 1-bit
    images go through PIL's conversion. A large JPEG is decoded at the most reduced scale (1/2, 1/4, 1/8) that
    keeps both its sides at least ``side`` (or ``side(image)`` of the image opened, not yet decoded), asked for
    ``DRAFT_SIDE`` at most, so its memory stays bounded.
    """
    with Image.open(source) as image:
        image.draft("RGB", (min(side(image) if callable(side) else side, DRAFT_SIDE),) * 2)
        if image.mode in WIDE_GREY:
            grey = np.asarray(image)
            image = Image.fromarray(eight_bit(grey, *grey_range(image, grey)))
        image.load()  # now: the file closes on leaving
        return image if image.mode == "RGB" else image.convert("RGB")  # (converting RGB would copy it)


class ImagePaths:
    """Images' paths, ``paths[i]`` the ``i``-th, never held as a Python object per image: as arrow dictionary arrays,
    one per part of the column as read (a manifest's row group), each its part's distinct paths once and an int32
    index an image. The images of a tar share one path (4 bytes an image); and a DataLoader worker reading them
    writes no page it shares with the process it forked from (reading a Python object writes its reference count,
    so a worker reading a list of paths copies the pages of its strings: their size again per worker)."""

    def __init__(self, paths: Sequence[str] | pd.Series) -> None:
        column = pa.array(paths)  # an Array, or the ChunkedArray of a frame's column read in parts
        parts = pa.chunked_array([column]) if isinstance(column, pa.Array) else column
        self.parts = parts.cast(CODED_PATHS)  # each part encoded on its own (a no-op for read_manifest_ids' paths)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> str:
        return self.parts[i].as_py()


class ImageDataset(Dataset):
    """(transform(RGB image), id) for the rows ``images`` of a manifest: ``id``, ``path`` and, for an image in a
    tar, where its bytes are (``tars.LOCATION``), read with one positioned read. It holds arrays, no Python object
    an image (``ImagePaths``, the ids and locations in numpy), so its DataLoader workers copy none of it."""

    def __init__(self, images: pd.DataFrame, transform: Callable) -> None:
        self.paths = ImagePaths(images["path"])
        self.ids = images["id"].to_numpy(np.int64, copy=True)  # not a view keeping the frame's other columns alive
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
            image = read_rgb(self.source(i), getattr(self.transform, "decode_side", DRAFT_SIDE))
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


@dataclass(frozen=True)
class PhotoTransform:
    """torchvision's ``steps``, from an RGB image to its uint8 tensor (3, H, W), and ``side``: the shortest side
    any image needs for ``steps`` to see it at full resolution; with ``crop``, the random resized crop that
    ``steps`` begin with, each image needs only what its own crop does (``decode_side``)."""

    steps: Callable[[Image.Image], torch.Tensor]
    side: int
    crop: Callable | None = None  # a torchvision RandomResizedCrop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.steps(image)

    def decode_side(self, image: Image.Image) -> int:
        """The shortest side ``image`` (opened, not decoded) needs (``ImageDataset`` decodes a JPEG down to it):
        with a ``crop``, where the crop ``steps`` will draw keeps its output's pixels a side, one to spare for
        rounding. That crop is drawn here from a copy of the generator's state, the same fractions of the image
        ``steps`` draw from the generator itself: the draws and their order are those of the crop alone."""
        if self.crop is None:
            return self.side
        with torch.random.fork_rng(devices=[]):
            _, _, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        reduction = min(height, width) / (max(self.crop.size) + 1)
        return math.ceil(min(image.size) / reduction) if reduction > 1 else min(image.size)


def network_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of uint8 images (N, 3, H, W), as the transforms hand them over, as the network takes it: on
    ``device``, in [0, 1], normalised as ImageNet (bit for bit torchvision's ToTensor then Normalize)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"network_input takes the transforms' uint8 images, not {images.dtype}")
    mean, std = (torch.tensor(v, device=device).view(-1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return images.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)


@dataclass(frozen=True)
class CentreCrop:
    """torchvision's Resize(``resize``) then CenterCrop(``crop``) of an image, as one bilinear resampling of the
    crop's box: only the crop's pixels computed, each within 1 level of the two steps' (float rounding)."""

    resize: int
    crop: int

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        long = int(self.resize * max(width, height) / min(width, height))  # truncated, as by torchvision's Resize
        resized_width, resized_height = (self.resize, long) if width <= height else (long, self.resize)
        left, top = (round((side - self.crop) / 2.0) for side in (resized_width, resized_height))
        x, y = width / resized_width, height / resized_height
        box = (left * x, top * y, (left + self.crop) * x, (top + self.crop) * y)
        return image.resize((self.crop, self.crop), Image.Resampling.BILINEAR, box=box)


def feature_transform(image_size: int) -> PhotoTransform:
    """Deterministic: resize to 256/224 of the size, center-crop; a JPEG decoded down to the resized side."""
    from torchvision import transforms  # here, not above: a stage that builds no transform skips its ~2 s import

    side = round(image_size * 256 / 224)
    return PhotoTransform(transforms.Compose([CentreCrop(side, image_size), transforms.PILToTensor()]), side)


def train_transform(image_size: int, min_crop_scale: float = 0.08) -> PhotoTransform:
    """Augmenting: random resized crop (of ``min_crop_scale`` to all of the image's area, torchvision's and the
    papers' 0.08 by default) and horizontal flip; a JPEG decoded down to where its crop still has ``image_size``
    pixels a side (``side``: where the smallest, narrowest crop does)."""
    from torchvision import transforms  # here, as in feature_transform

    crop = transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), ratio=CROP_RATIO)
    steps = transforms.Compose([crop, transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    return PhotoTransform(steps, math.ceil(image_size / math.sqrt(min_crop_scale * min(CROP_RATIO))), crop)
