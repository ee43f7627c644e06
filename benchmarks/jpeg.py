"""The 224-px JPEG path of the papers' networks, what the CPU does to feed the GPUs: photographs decoded and
transformed into the uint8 batches the features and training stages hand to the device (which normalises them:
``network_input``), against today's bare PIL + torchvision loop (a decode down to no less than 1,024 px, float
tensors normalised image by image on the CPU) and against the decoder alone."""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.inputs import photographs
from benchmarks.report import Report, timed_pair
from deepercluster.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    PhotoTransform,
    feature_transform,
    network_input,
    read_rgb,
    train_transform,
)
from deepercluster.evaluate.backbone import device

IMAGE_SIZE = 224
BARE_DRAFT_SIDE = 1024  # today's decode: a JPEG's sides no less than this
# Long sides: photos as web crawls store them, and as cameras write them.
PHOTO_SIDES = {"small": (160, 900), "camera": (2300, 2500)}
# (path, photos) -> goal of ours against the bare loop (issue 27)
GOALS = {
    ("features", "camera"): 3.0,
    ("features", "small"): 1.4,
    ("training", "camera"): 1.2,
    ("training", "small"): 1.2,
}
DECODER_GOAL = 0.5  # decoding at least half of our path's time: its other steps cost no more than the decode


def bare_steps(path: str) -> Callable[[Image.Image], torch.Tensor]:
    """Today's torchvision transform of the features or training ``path``, to a normalised float tensor."""
    from torchvision import transforms

    crop = {
        "features": [transforms.Resize(round(IMAGE_SIZE * 256 / 224)), transforms.CenterCrop(IMAGE_SIZE)],
        "training": [transforms.RandomResizedCrop(IMAGE_SIZE), transforms.RandomHorizontalFlip()],
    }
    return transforms.Compose([*crop[path], transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def bare_loop(paths: list[str], steps: Callable, batch_size: int) -> None:
    """Today's loop: each photo opened with PIL, decoded down to ``BARE_DRAFT_SIDE``, converted, transformed."""

    def read(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            image.draft("RGB", (BARE_DRAFT_SIDE, BARE_DRAFT_SIDE))
            return steps(image.convert("RGB"))

    for start in range(0, len(paths), batch_size):
        torch.stack([read(path) for path in paths[start : start + batch_size]])


def our_loop(paths: list[str], transform: PhotoTransform, batch_size: int) -> None:
    """The stages' loop: ``ImageDataset``'s uint8 batches (``network_input`` then runs on the device)."""
    torch.manual_seed(0)
    for _ in DataLoader(ImageDataset.of_files(paths, transform), batch_size=batch_size):
        pass


def decoding(paths: list[str], transform: PhotoTransform) -> None:
    """``read_rgb`` alone, each photo decoded to the scale our path decodes it to (the training crops drawn as
    our loop draws them)."""
    torch.manual_seed(0)
    for path in paths:
        image = read_rgb(path, transform.decode_side)
        if transform.crop is not None:
            transform.crop.get_params(image, transform.crop.scale, transform.crop.ratio)


def jpeg_case(report: Report, work: Path, small: int, camera: int, batch_size: int, repeats: int) -> None:
    """The features and training paths on ``small`` web-sized and ``camera`` camera-sized photographs, on one core
    as a DataLoader worker runs: torch's ops of both loops on one thread, timed by the process's CPU time (what a
    core spends, whatever else the machine runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for photos, count in (("camera", camera), ("small", small)):
        paths = photographs(work / f"photos-{photos}", count, PHOTO_SIDES[photos])
        for path, transform in (("features", feature_transform(IMAGE_SIZE)), ("training", train_transform(IMAGE_SIZE))):
            path_rows(report, paths, photos, path, transform, batch_size, repeats)
    batch = torch.randint(0, 256, (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    seconds = min(timeit.repeat(lambda: network_input(batch, device()), timer=time.process_time, number=1, repeat=5))
    report.figure(f"network_input, on {device().type.upper()}", f"{seconds / batch_size * 1e3:.3f} ms per image")
    torch.set_num_threads(threads)


def path_rows(
    report: Report, paths: list[str], photos: str, path: str, transform: PhotoTransform, batch_size: int, repeats: int
) -> None:
    """Our ``path`` (features or training) on the photographs ``paths`` against the bare loop, and against
    decoding alone (``read_rgb`` at our decode's scale)."""
    ours, cpu = (lambda: our_loop(paths, transform, batch_size)), time.process_time
    ours_s, bare_s = timed_pair(repeats, ours, lambda: bare_loop(paths, bare_steps(path), batch_size), clock=cpu)
    again_s, decode_s = timed_pair(repeats, ours, lambda: decoding(paths, transform), clock=cpu)
    ours_s, n, sides = min(ours_s, again_s), len(paths), PHOTO_SIDES[photos]
    name, sizes = (
        f"JPEG {path} path, {photos} photos",
        f"{n} JPEGs {sides[0]}-{sides[1]} px, {IMAGE_SIZE} px, 1 core",
    )
    report.add(
        name,
        sizes,
        f"{n / ours_s:.0f} img/s",
        f"{n / bare_s:.0f} img/s (PIL + torchvision)",
        bare_s / ours_s,
        ">=",
        GOALS[path, photos],
    )
    report.add(
        f"{name}, against decoding alone",
        f"{sizes}, decoded as ours",
        f"{n / ours_s:.0f} img/s",
        f"{n / decode_s:.0f} img/s (decoding)",
        decode_s / ours_s,
        ">=",
        DECODER_GOAL,
    )
    report.figure(f"{name}, 1 core to uint8 batches", f"{n / ours_s:.0f} img/s")
