"""The network's benchmarks: extraction and training throughput against a bare torch loop on the same images, a
features job's memory against its manifest's size, a training rank's memory per image against a bare read of its
rows, one rank's sub-class head memory against its prediction."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.inputs import DEFAULTS, IMAGE_SIZE, ImageRound
from benchmarks.peak import reset_high_water
from benchmarks.report import MB, Report, peak_rss, timed_pair
from deepercluster.checkpoints import load_model
from deepercluster.data.images import ImageDataset, feature_transform, network_input, train_transform
from deepercluster.distributed import Distributed
from deepercluster.evaluate.backbone import device
from deepercluster.features import extract_features
from deepercluster.formats.labels import Labels, read_labels, write_labels
from deepercluster.formats.manifest import LOCATION, write_manifest
from deepercluster.methods import METHODS
from deepercluster.nn.heads import Heads, linear_head, targets_for
from deepercluster.train.block import block_data, train_block
from deepercluster.train.settings import BlockSettings


def features_case(
    report: Report,
    images: ImageRound,
    work: Path,
    batch_size: int,
    repeats: int,
    image_size: int = IMAGE_SIZE,
    workers: int = 0,
    bound: float = 0.85,
) -> None:
    """The features stage against a bare torch forward loop over the same DataLoader, on the stage's device."""
    n = len(images.paths)

    def ours() -> None:
        extract_features(
            manifest=images.manifest,
            checkpoint=images.checkpoint,
            shard=0,
            shard_size=n,
            image_size=image_size,
            out=str(work / "shard-0.h5"),
            batch_size=batch_size,
            workers=workers,
            dtype=DEFAULTS["features"]["dtype"],
        )

    @torch.no_grad()
    def bare() -> None:
        model, _ = load_model(images.checkpoint)
        model.to(device()).eval()
        dataset = ImageDataset(images.frame(), feature_transform(image_size))
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device().type == "cuda")
        np.concatenate([model(network_input(x, device())).cpu().numpy() for x, _ in loader])

    ours_s, bare_s = timed_pair(repeats, ours, bare)
    sizes = f"{n} images {image_size}px, {images.arch}, batch {batch_size}"
    report.add(
        "features throughput",
        sizes,
        f"{n / ours_s:.0f} img/s",
        f"{n / bare_s:.0f} img/s (torch)",
        bare_s / ours_s,
        ">=",
        bound,
    )
    report.figure(f"extraction, {images.arch} {image_size}px, {device().type.upper()}", f"{n / ours_s:.0f} img/s")


def features_memory_case(report: Report, images: ImageRound, work: Path, rows: int, shard_size: int) -> None:
    """Peak memory of a features job (``shard_size`` images) whose manifest lists N and 4N images (its paths those of
    ``images`` repeated, written by the manifest stage's writer): flat in N when the job reads only its rows."""
    peaks = {}
    for n in (rows, 4 * rows):
        manifest = work / f"manifest-{n}.parquet"
        write_manifest(manifest, pd.DataFrame({"id": np.arange(n), "path": np.resize(np.asarray(images.paths), n)}))
        peaks[n] = peak_rss(
            [
                "-m",
                "deepercluster",
                "--threads",
                "2",
                "features",
                "--manifest",
                str(manifest),
                "--checkpoint",
                images.checkpoint,
                "--shard",
                "0",
                "--shard-size",
                str(shard_size),
                "--image-size",
                str(IMAGE_SIZE),
                "--batch-size",
                str(shard_size),
                "--workers",
                "0",
                "--dtype",
                "float32",
                "--out",
                str(work / f"memory-shard-{n}.h5"),
            ]
        )
    report.add(
        "features job peak RSS, 4N vs N",
        f"manifest of N={rows} images, a shard of {shard_size}",
        f"{peaks[4 * rows]:.0f} MB",
        f"{peaks[rows]:.0f} MB",
        peaks[4 * rows] / peaks[rows],
        "<=",
        1.1,
    )
    report.figure(
        f"features job peak RSS, manifest of {rows} / {4 * rows} images",
        f"{peaks[rows]:.0f} / {peaks[4 * rows]:.0f} MB, "
        f"{(peaks[4 * rows] - peaks[rows]) * MB / (3 * rows):.1f} B more per image",
    )


def training_memory_case(report: Report, work: Path, rows: int) -> None:
    """Peak memory of a training rank's data (``rank_data``) for a manifest of N and 4N images in tars, per image
    more at 4N, against the same rows read by pyarrow alone (``arrow_rows``: the manifest's id, path and location
    and the labels, 127 B of data an image): the design's cost of a rank's images (docs/scale.md's memory table)."""
    added = {}
    for name in ("rank_data", "arrow_rows"):
        peaks = [
            peak_rss(["-c", f"from benchmarks.network import {name}; {name}{rank_inputs(work, n)!r}"])
            for n in (rows, 4 * rows)
        ]
        added[name] = (peaks[1] - peaks[0]) * MB / (3 * rows)
    report.add(
        "training rank peak RSS, 4N vs N",
        f"manifest of N={rows} images in 100 tars, labels 4 x {rows // 1200} clusters, one rank",
        f"{added['rank_data']:.0f} B per image",
        f"{added['arrow_rows']:.0f} B per image (pyarrow)",
        added["rank_data"] / added["arrow_rows"],
        "<=",
        1.5,
    )
    report.figure("training rank peak RSS per image, 4N vs N", f"{added['rank_data']:.0f} B more per image")


def rank_inputs(work: Path, n: int, tars: int = 100) -> tuple[str, str]:
    """The manifest (its rows only: the tars are never opened) and labels of ``n`` images in ``tars`` tars, in 4
    super-clusters of ~300 images a cluster, as the round at a million images; written once."""
    manifest, labels = work / f"rank-{n}" / "manifest.parquet", work / f"rank-{n}" / "labels.parquet"
    if not labels.exists():
        manifest.parent.mkdir(parents=True, exist_ok=True)
        ids, rng = np.arange(n), np.random.default_rng(0)
        tar = ids * tars // n
        paths = np.array([str(work / "tars" / f"shard-{t:06d}.tar") for t in range(tars)])[tar]
        location = {
            "offset": 512 + 1024 * (ids - tar * n // tars),
            "size": np.full(n, 512),
            "tar_size": np.full(n, 10_000_000),
        }
        write_manifest(manifest, pd.DataFrame({"id": ids, "path": paths, **location, "tar_mtime": 1.8e9}))
        k = max(1, n // 1200)
        clusters = {"super_cluster": rng.integers(0, 4, n), "sub_cluster": rng.integers(0, k, n)}
        write_labels(labels, Labels(pd.DataFrame({"id": ids, **clusters}), [k] * 4))
    return str(manifest), str(labels)


def rank_data(manifest: str, labels: str) -> None:
    """What a training rank holds through an epoch, built as the block builds it: its images, their labels and
    sampler (``block_data``), then the epoch's draws; the peak counted from after the imports."""
    train_transform(IMAGE_SIZE)  # torchvision imported before the count starts
    reset_high_water()
    context = Distributed(0, 1, torch.device("cpu"))
    data = block_data(manifest, labels, METHODS["deepercluster"], context, block_settings()["settings"])
    data.sampler.epoch(0)


def arrow_rows(manifest: str, labels: str) -> tuple[pa.Table, pa.Table]:
    """The same rows in their plainest form, read by pyarrow: the manifest's id, path and location, and the labels."""
    reset_high_water()
    return pq.read_table(manifest, columns=["id", "path", *LOCATION]), pq.read_table(labels)


def training_case(report: Report, images: ImageRound, work: Path, batch_size: int, repeats: int) -> None:
    """One epoch of the training block against a bare SGD loop: same model, heads, batch size and images."""
    n, runs = len(images.paths), itertools.count()
    iterations = n // batch_size

    def ours() -> None:
        folder = work / f"train-{next(runs)}"  # a fresh folder: nothing to resume
        train_block(
            manifest=images.manifest,
            previous_checkpoint=images.checkpoint,
            out=str(folder / "out.pt"),
            train_dir=str(folder),
            method="deepercluster",
            round=1,
            labels=images.labels,
            **block_settings(epochs=1, batch_size=batch_size, image_size=IMAGE_SIZE),
        )

    ours_s, bare_s = timed_pair(repeats, ours, lambda: bare_training(images, batch_size))
    sizes = f"{n} images, small_convnet, {iterations} steps of {batch_size}, heads 8 + 8x5"
    report.add(
        "training throughput",
        sizes,
        f"{iterations * batch_size / ours_s:.0f} img/s",
        f"{iterations * batch_size / bare_s:.0f} img/s (torch)",
        bare_s / ours_s,
        ">=",
        0.9,
    )
    report.figure(
        f"training step, small_convnet {IMAGE_SIZE}px, batch {batch_size}, CPU", f"{ours_s / iterations:.3f} s"
    )


def bare_training(images: ImageRound, batch_size: int, image_size: int = IMAGE_SIZE, workers: int = 0) -> list[float]:
    """The plain loop on the stages' device: shuffled DataLoader, random rotations, forward, both heads' loss,
    backward, SGD step, the loss read back (as a loop that prints it); returns each step's seconds, waiting for its
    batch included."""
    model, _ = load_model(images.checkpoint)
    labels = read_labels(images.labels)
    table = labels.table.set_index("id").loc[images.ids]
    on = device()
    supers, subs = (torch.tensor(table[c].to_numpy(np.int64), device=on) for c in ("super_cluster", "sub_cluster"))
    method = METHODS["deepercluster"]
    targets = targets_for(method, labels.sub_clusters)
    torch.manual_seed(0)
    heads = Heads(model.feature_dim, targets).to(on)
    model.to(on).train()
    heads.train()
    optimizer = torch.optim.SGD([*model.parameters(), *heads.parameters()], lr=0.05, momentum=0.9, weight_decay=1e-5)
    dataset = ImageDataset.of_files(images.paths, train_transform(image_size))
    loader = DataLoader(
        dataset,
        batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
        pin_memory=on.type == "cuda",
    )
    steps, tick = [], time.perf_counter()
    for x, index in loader:
        rotation, x = torch.randint(0, 4, (len(x),)), network_input(x, on)
        x = torch.stack([torch.rot90(image, int(r), dims=(1, 2)) for image, r in zip(x, rotation, strict=True)])
        index, rotation = index.to(on), rotation.to(on)
        losses = heads(model(x), method.super_class(supers[index], rotation), subs[index])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        float(losses["loss"].detach())
        now = time.perf_counter()
        steps.append(now - tick)
        tick = now
    return steps


def head_step(k: int, dim: int, batch: int) -> None:
    """Two SGD steps (momentum, weight decay) of a k-class linear head: a rank's part of its group's W_g."""
    torch.manual_seed(0)
    head = linear_head(dim, k)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    for _ in range(2):
        loss = F.cross_entropy(head(torch.randn(batch, dim)), torch.randint(0, k, (batch,)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def head_memory_case(report: Report, k: int, dim: int, batch: int, parts: int) -> None:
    """Peak memory of a step of one rank's part of a group's sub-class head (k / parts classes of W_g) against
    the prediction 4 x 4 bytes x (k d + k) / parts: weights, gradients, momentum and SGD's weight-decay
    temporary (grad + wd w, foreach), in float32; the issue's bound is 2 GiB. Measured over the same steps of a
    one-class head: the imports and what a first step sets up once (about 170 MB here), not the head's."""
    rows = -(-k // parts)
    base, step = (
        peak_rss(["-c", f"from benchmarks.network import head_step; head_step({classes}, {dim}, {batch})"])
        for classes in (1, rows)
    )
    predicted = 4 * 4 * (rows * dim + rows) / MB
    report.add(
        "sub-class head memory (one rank)",
        f"k={k} over {parts} ranks, d={dim}, batch {batch}; bound 2 GiB",
        f"{step - base:.0f} MB",
        f"{predicted:.0f} MB (predicted)",
        (step - base) / predicted,
        "<=",
        1.1,
    )
    report.figure("sub-class head step, one rank's part, peak", f"{step - base:.0f} MB (the bound: 2 GiB = 2147 MB)")


def block_settings(workers: int = 0, **changes: object) -> dict:
    """``train_block``'s arguments but its files: DeeperCluster's settings of the schema's defaults (seed 0), with
    ``changes`` to their fields (the benchmark sets epochs, batch, image size), and ``workers``."""
    settings = replace(BlockSettings.of(DEFAULTS, DEFAULTS["methods"]["deepercluster"], seed=0), **changes)
    return {"settings": settings, "workers": workers, "checkpoint_every": DEFAULTS["train"]["checkpoint_every"]}
