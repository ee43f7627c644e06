"""An uncurated pool drawn from a labelled set (``data.uncurated``), as the miniatures of uncurated pre-training in
the literature build one (Liu et al. 2022; Jiang et al. 2021; Assran et al. 2023; Vo et al. 2024): of the same size
as the curated set it replaces, with

- a long tail: the classes' sizes fall exponentially from the head class to the tail class, ``tail_ratio`` to 1,
  which class is the head decided by the seed;
- near-duplicates: a ``duplicate_share`` of the pool is copies of a few of its images (``DUPLICATES_EACH`` copies
  each, as a crawl holds the same picture many times), each shifted, its contrast changed and noise added;
- distractors: a ``distractor_share`` of the pool belongs to no class: blank images, noise, gradients and rendered
  text, a quarter each.

Each image's row says what it is: ``label`` (its class; "none" for a distractor), ``kind`` (original, duplicate,
distractor), ``original`` (the index in the labelled set of the image it is or copies; -1 for a distractor).
"""

from __future__ import annotations

import string

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

DUPLICATES_EACH = 10
NO_CLASS = "none"  # the label of a distractor, an image of no class
DISTRACTORS = ("blank", "noise", "gradient", "text")
SHIFT = 2  # pixels a near-duplicate moves at most
NOISE_SD = 6.0  # grey levels of a near-duplicate's added noise


def class_sizes(count: int, classes: int, tail_ratio: float) -> np.ndarray:
    """``count`` images over ``classes``, falling exponentially from the first to the last, ``tail_ratio`` : 1."""
    weights = tail_ratio ** (-np.arange(classes) / max(1, classes - 1))
    sizes = np.floor(count * weights / weights.sum()).astype(np.int64)
    sizes[: count - sizes.sum()] += 1  # the remainder to the head classes
    return sizes


def long_tail(labels: np.ndarray, count: int, tail_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of ``count`` images of ``labels``, the classes in a seeded order given ``class_sizes``."""
    classes = rng.permutation(np.unique(labels))
    sizes = class_sizes(count, len(classes), tail_ratio)
    short = [c for c, n in zip(classes, sizes, strict=True) if n > (labels == c).sum()]
    if short:
        raise ValueError(f"class {short[0]} has fewer images than the long tail gives it; lower data.max_images")
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, sizes, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def near_duplicate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` shifted by up to ``SHIFT`` pixels, its contrast scaled by 0.9 to 1.1, Gaussian noise added."""
    moved = np.roll(image, tuple(rng.integers(-SHIFT, SHIFT + 1, size=2)), axis=(0, 1)).astype(np.float64)
    moved = (moved - moved.mean()) * rng.uniform(0.9, 1.1) + moved.mean() + rng.normal(0, NOISE_SD, image.shape)
    return np.clip(np.rint(moved), 0, 255).astype(np.uint8)


def distractor(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An image of no class: a uniform grey, uniform noise, a linear gradient in a random direction, or a few
    random letters in PIL's default font."""
    if kind == "blank":
        return np.full(shape, rng.integers(0, 256), np.uint8)
    if kind == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "gradient":
        y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
        angle = rng.uniform(0, 2 * np.pi)
        ramp = x * np.cos(angle) + y * np.sin(angle)
        return np.rint(255 * (ramp - ramp.min()) / np.ptp(ramp)).astype(np.uint8)
    canvas = Image.new("L", shape[::-1], int(rng.integers(0, 128)))
    text = "".join(rng.choice(list(string.ascii_letters + string.digits), size=3))
    ImageDraw.Draw(canvas).text((int(rng.integers(0, 6)), int(rng.integers(0, 16))), text, fill=255)
    return np.asarray(canvas)


def uncurated_pool(
    images: np.ndarray, labels: np.ndarray, size: int, settings: dict[str, float], seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows (``kind``, ``original``, ``label`` index or -1) and the pixels of a pool of ``size`` images drawn
    from ``images`` and ``labels`` by ``settings`` (``tail_ratio``, ``duplicate_share``, ``distractor_share``)."""
    rng = np.random.default_rng(seed)
    copied = round(size * settings["duplicate_share"] / DUPLICATES_EACH)
    distractors = round(size * settings["distractor_share"])
    originals = long_tail(labels, size - copied * DUPLICATES_EACH - distractors, settings["tail_ratio"], rng)
    sources = np.repeat(rng.choice(originals, size=copied, replace=False), DUPLICATES_EACH)
    kinds = np.array(DISTRACTORS)[np.arange(distractors) % len(DISTRACTORS)]
    pixels = np.concatenate(
        [
            images[originals],
            np.stack([near_duplicate(images[i], rng) for i in sources]).reshape(-1, *images.shape[1:]),
            np.stack([distractor(k, images.shape[1:], rng) for k in kinds]).reshape(-1, *images.shape[1:]),
        ]
    )
    rows = pd.DataFrame(
        {
            "kind": ["original"] * len(originals) + ["duplicate"] * len(sources) + [f"distractor-{k}" for k in kinds],
            "original": np.concatenate([originals, sources, np.full(distractors, -1)]),
        }
    )
    rows["label"] = np.where(rows["original"] >= 0, labels[rows["original"].clip(lower=0)].astype(np.int64), -1)
    return rows, pixels
