"""The manifest stage at scale: its rate and peak memory at N and 4N images, as a folder and as tar shards; and
reading images from tar shards against the same images as loose files."""

from __future__ import annotations

import resource
import shlex
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks.collection import add_member, png
from benchmarks.report import Report, peak_rss, timed_pair
from deepercluster.data.images import ImageDataset
from deepercluster.formats.manifest import read_manifest
from deepercluster.stages import options

FILES_PER_FOLDER = 1_000
QUARTERS = "abcd"  # the 4N collection is four N collections side by side, the first of them the N one


def image_bytes(seed: int) -> bytes:
    """A 32 x 32 greyscale PNG of seeded noise (Fashion-MNIST's size, as the demo's files)."""
    return png(np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8))


def write_collection(root: Path, rows: int, per_tar: int) -> None:
    """``4 * rows`` images as files (``root/files/{quarter}/{folder}/{i}.png``) and as tars of ``per_tar``
    (``root/tars/{quarter}/shard-{j}.tar``, each image with a ``.cls``), the first quarter ``rows`` of each."""
    images = [image_bytes(seed) for seed in range(64)]
    for quarter in QUARTERS:
        files, tars = root / "files" / quarter, root / "tars" / quarter
        for i in range(rows):
            path = files / f"{i // FILES_PER_FOLDER:05d}" / f"{i:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(images[i % len(images)])
        tars.mkdir(parents=True, exist_ok=True)
        for start in range(0, rows, per_tar):
            with tarfile.open(tars / f"shard-{start // per_tar:06d}.tar", "w") as tar:
                for i in range(start, min(rows, start + per_tar)):
                    add_member(tar, f"{quarter}{i:08d}.png", images[i % len(images)])
                    add_member(tar, f"{quarter}{i:08d}.cls", str(i % 10).encode())


class StageRun(NamedTuple):
    wall: float  # seconds
    cpu: float  # seconds of the stage and its workers: what scales with N on a shared machine, where wall moves
    peak: float  # MB, the stage's own process


def manifest_run(source: str, path: Path, out: Path, verify: str) -> StageRun:
    """The manifest stage on ``path``, 2 workers, timed and its peak memory read."""
    settings = options(
        source=source,
        path=str(path),
        manifest=str(out / "manifest.parquet"),
        skipped=str(out / "skipped.tsv"),
        seed=0,
        label_from_folder=False,
        path_column="path",
        verify_images=verify,
        workers=2,
    )
    command = ["-m", "deepercluster", "manifest", *shlex.split(settings)]
    out.mkdir(parents=True, exist_ok=True)
    tick, cpu = time.perf_counter(), children_cpu()
    peak = peak_rss(command)
    return StageRun(time.perf_counter() - tick, children_cpu() - cpu, peak)


def children_cpu() -> float:
    """User and system seconds of the waited-for child processes (and theirs) so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def manifest_case(report: Report, work: Path, rows: int, per_tar: int) -> None:
    """The manifest stage at N and 4N images, folder and tar shards, no image decoded: its peak memory flat in N, its
    time linear; then the rate of decoding every image of N (verify_images: all)."""
    write_collection(work / "collection", rows, per_tar)
    for source, folder in (("folder", "files"), ("tar", "tars")):
        small = manifest_run(source, work / "collection" / folder / QUARTERS[0], work / f"m-{source}-n", "none")
        large = manifest_run(source, work / "collection" / folder, work / f"m-{source}-4n", "none")
        sizes = f"N={rows} images{f', tars of {per_tar}' if source == 'tar' else ''}, no image decoded"
        memory = (f"{large.peak:.0f} MB", f"{small.peak:.0f} MB", large.peak / small.peak)
        report.add(f"manifest peak RSS, 4N vs N ({source})", sizes, *memory, "<=", 1.1)
        per_image = (large.cpu / (4 * rows), small.cpu / rows)
        cpu = (f"{per_image[0] * 1e6:.1f} us", f"{per_image[1] * 1e6:.1f} us", per_image[0] / per_image[1])
        report.add(f"manifest CPU time per image, 4N vs N ({source})", sizes, *cpu, "<=", 1.1)
        report.figure(
            f"manifest stage ({source}), N / 4N images, none decoded, wall",
            f"{rows / small.wall:.0f} / {4 * rows / large.wall:.0f} img/s, {small.peak:.0f} / {large.peak:.0f} MB",
        )
        verified = manifest_run(source, work / "collection" / folder / QUARTERS[0], work / f"m-{source}-all", "all")
        report.figure(
            f"manifest stage ({source}), N images, all decoded (2 workers), wall", f"{rows / verified.wall:.0f} img/s"
        )


def tar_read_case(report: Report, work: Path, rows: int, repeats: int = 5) -> None:
    """Reading and decoding the same images from tar shards (one pread each) and as loose files (open, read,
    close), best of ``repeats`` alternating passes, on the manifests ``manifest_case`` built; both from the page
    cache (this machine's disk is no parallel file system, where an open costs far more)."""
    frames = {
        s: read_manifest(str(work / f"m-{s}-n" / "manifest.parquet")).iloc[: min(rows, 20_000)]
        for s in ("tar", "folder")
    }
    sets = {source: ImageDataset(frame, np.asarray) for source, frame in frames.items()}

    def read(source: str) -> None:
        images = sets[source]
        for i in range(len(images)):
            images[i]

    ours, bare = timed_pair(repeats, lambda: read("tar"), lambda: read("folder"), clock=time.process_time)
    n = len(frames["tar"])
    report.add(
        "image reads, tar shards vs loose files",
        f"{n} PNGs of 32 px, page cache warm, 1 process, CPU time",
        f"{n / ours:.0f} img/s",
        f"{n / bare:.0f} img/s (files)",
        bare / ours,
        ">=",
        1.0,
    )
