"""Images as every stage reads them: decoded to 8-bit RGB whatever their mode, and the transforms of the
papers (a deterministic centre crop for features, a random resized crop and flip for training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from deepercluster.errors import UnreadableImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that keeps both sides at least this long.
DRAFT_SIDE = 1024
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # greyscale modes of 16-bit PNGs and TIFFs


def read_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, whatever its mode.

    16-bit greyscale is scaled by 255/65535 (PIL's convert would clip it); alpha is dropped;
    CMYK, palette and 1-bit images go through PIL's conversion. A large JPEG is decoded at a
    reduced scale with both sides at least ``DRAFT_SIDE``, so its memory stays bounded.
    """
    with Image.open(path) as image:
        image.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))
        if image.mode in SIXTEEN_BIT:
            grey = np.asarray(image).astype(np.int64).clip(0, 65535)
            image = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8))
        return image.convert("RGB")


class ImageDataset(Dataset):
    """(transform(RGB image), id) for the images of a manifest."""

    def __init__(self, paths: Sequence[str], ids: Sequence[int], transform: Callable) -> None:
        if len(paths) != len(ids):
            raise ValueError(f"ImageDataset got {len(paths)} paths but {len(ids)} ids; pass one id per path")
        self.paths = list(paths)
        self.ids = [int(i) for i in ids]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = read_rgb(self.paths[i])
        except READ_ERRORS as error:
            raise UnreadableImageError(
                f"cannot read image {self.paths[i]} ({type(error).__name__}: {error}); the image was "
                "readable when results/data/manifest.parquet was built; restore it, or delete the manifest "
                "and rerun to skip it"
            ) from error
        return self.transform(image), self.ids[i]


def feature_transform(image_size: int) -> Callable:
    """Deterministic: resize to 256/224 of the size, center-crop, normalise as ImageNet."""
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
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
