"""``python -m benchmarks.collection OUT --copies C [--per-tar N]``: a collection of ``70,000 x C`` images as
WebDataset tar shards, for runs at a million images and more (docs/scale.md, "A round at a million images").

Fashion-MNIST's 70,000 images (both splits), C times: copy 0 as they are, each later copy a seeded augmentation
of each (a shift of up to 3 pixels, a horizontal flip, a contrast of 0.7 to 1.3), so no two images are equal.
Each image is ``{key}.png`` with ``{key}.cls`` (its class name) and ``{key}.json`` (``split``, ``copy``), in
tars of ``--per-tar`` images, written by two processes.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from deepercluster.data.manifest import FASHION_MNIST_CLASSES, _load_fashion_mnist
from deepercluster.files import atomic_output

SHIFT = 3


def augmented(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` shifted, maybe flipped, its contrast scaled about its mean."""
    dy, dx = rng.integers(-SHIFT, SHIFT + 1, size=2)
    moved = np.roll(image, (dy, dx), axis=(0, 1))
    moved = moved[:, ::-1] if rng.random() < 0.5 else moved
    mean = moved.mean()
    return np.clip((moved - mean) * rng.uniform(0.7, 1.3) + mean, 0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    """``pixels`` (uint8) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """``data`` as the member ``name`` of ``tar``."""
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def write_tar(out: Path, shard: int, per_tar: int) -> None:
    """Tar ``shard``: images ``[shard * per_tar, (shard + 1) * per_tar)`` of the copies laid end to end."""
    splits = _load_fashion_mnist(out / "fashion-mnist")  # Debian's files, else a download there
    images = np.concatenate([pixels for pixels, _ in splits.values()])
    labels = np.concatenate([classes for _, classes in splits.values()])
    names = np.concatenate([[split] * len(classes) for split, (_, classes) in splits.items()])
    with atomic_output(out / f"shard-{shard:06d}.tar") as partial, tarfile.open(partial, "w") as tar:
        for index in range(shard * per_tar, (shard + 1) * per_tar):
            copy, i = divmod(index, len(images))
            rng = np.random.default_rng([copy, i])
            pixels = images[i] if copy == 0 else augmented(images[i], rng)
            key = f"{copy:03d}-{i:05d}"
            add_member(tar, f"{key}.png", png(pixels))
            add_member(tar, f"{key}.cls", FASHION_MNIST_CLASSES[labels[i]].encode())
            add_member(tar, f"{key}.json", json.dumps({"split": str(names[i]), "copy": copy}).encode())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collection", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--copies", type=int, required=True)
    parser.add_argument("--per-tar", type=int, default=10_000)
    args = parser.parse_args()
    total = 70_000 * args.copies
    if total % args.per_tar:
        parser.error(f"--per-tar must divide the {total} images")
    shards = [s for s in range(total // args.per_tar) if not (args.out / f"shard-{s:06d}.tar").exists()]
    with multiprocessing.Pool(2) as pool:
        pool.starmap(write_tar, [(args.out, s, args.per_tar) for s in shards])


if __name__ == "__main__":
    main()
