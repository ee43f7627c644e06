"""The training block of a round: ``epochs`` epochs on the round's pseudo-labels, resumable exactly.

Reads top to bottom: data, networks, loss, optimiser, resume, loop. The block saves
``train/last.pt`` (model, heads, optimiser, sampler position, RNG state) every
``checkpoint_every`` iterations and at every epoch end; run again after a kill, it resumes
from there and ends with the same weights as an uninterrupted run. Data augmentation is
seeded per sample from (seed, epoch, position), so it does not depend on DataLoader
workers or on where the block was interrupted.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from deepercluster.checkpoints import load_checkpoint, load_model, save_checkpoint
from deepercluster.data import ImageDataset, read_manifest, train_transform
from deepercluster.files import sha256
from deepercluster.labels import read_labels
from deepercluster.objectives import Heads, super_class, targets_for
from deepercluster.sampler import UniformClusterSampler

log = logging.getLogger(__name__)

METRICS = [
    *("round", "epoch", "iteration", "lr", "images_per_s"),
    *("loss", "loss_super", "acc_super", "loss_sub", "acc_sub"),
]


class RotatedImages(Dataset):
    """Item (index, rotation, sample_seed) -> (augmented image rotated by rotation x 90 degrees, index, rotation)."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
        index, rotation, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            image, _ = self.images[index]
        return torch.rot90(image, rotation, dims=(1, 2)), index, rotation


def epoch_batches(
    indices: np.ndarray, rotations: np.ndarray, batch_size: int, start: int, seed: int, epoch: int
) -> list[list[tuple[int, int, int]]]:
    """Batches of (index, rotation, sample_seed) from batch ``start`` on; the last incomplete batch is dropped."""
    keys = [
        (int(i), int(r), int(np.random.SeedSequence([seed, epoch, p]).generate_state(1)[0]))
        for p, (i, r) in enumerate(zip(indices, rotations, strict=True))
    ]
    return [keys[b * batch_size : (b + 1) * batch_size] for b in range(start, len(keys) // batch_size)]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cluster_table(manifest: pd.DataFrame, labels: str | None) -> pd.DataFrame:
    """super_cluster and sub_cluster of every manifest row (all zero without labels: RotNet)."""
    if labels is None:
        return pd.DataFrame({"super_cluster": 0, "sub_cluster": 0}, index=manifest.index)
    table = read_labels(labels).set_index("id").reindex(manifest["id"])
    if table.isna().any().any():
        raise ValueError(f"{labels} lacks some images of the manifest: rerun the round's labels stage")
    return table.reset_index(drop=True).astype(np.int64)


class MetricsLog:
    """``metrics.tsv``, one row per iteration; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_at: int) -> None:
        rows = pd.read_csv(path, sep="\t") if path.exists() and resume_at else pd.DataFrame(columns=METRICS)
        rows[rows["iteration"] < resume_at].to_csv(path, sep="\t", index=False)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed by close())
        self.writer = csv.DictWriter(self.file, METRICS, delimiter="\t")

    def write(self, **row: float) -> None:
        self.writer.writerow(row)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train_block(
    *,
    manifest: str,
    previous_checkpoint: str,
    out: str,
    train_dir: str,
    method: str,
    round: int,
    labels: str | None = None,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    image_size: int = 32,
    workers: int = 0,
    checkpoint_every: int = 1000,
    seed: int = 0,
) -> None:
    """Stage 'train' (inside its launcher): one training block of round ``round``; writes ``out``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    Path(train_dir).mkdir(parents=True, exist_ok=True)
    last = Path(train_dir) / "last.pt"
    provenance = {
        "previous_sha256": sha256(previous_checkpoint),
        "labels_sha256": sha256(labels) if labels else None,
        "method": method,
    }

    # Data: the images, their clusters, a sampler uniform over clusters.
    images = read_manifest(manifest)
    clusters = cluster_table(images, None if method == "rotnet" else labels)
    sub_per_super = clusters.groupby("super_cluster")["sub_cluster"].max().add(1).sort_index().tolist()
    targets = targets_for(method, sub_per_super)
    flat_cluster = clusters["super_cluster"].to_numpy() * max(sub_per_super) + clusters["sub_cluster"].to_numpy()
    sampler = UniformClusterSampler(flat_cluster, rotate=targets.rotates, seed=seed)
    dataset = RotatedImages(ImageDataset(images["path"].tolist(), images["id"].tolist(), train_transform(image_size)))
    batch_size = min(batch_size, len(dataset))
    iterations_per_epoch = len(dataset) // batch_size
    super_clusters = torch.tensor(clusters["super_cluster"].to_numpy())
    sub_clusters = torch.tensor(clusters["sub_cluster"].to_numpy())

    # Networks and optimiser: the backbone carries over, the heads are new each round.
    model, previous = load_model(previous_checkpoint)
    torch.manual_seed(seed)
    heads = Heads(model.feature_dim, targets)
    model.to(device).train()
    heads.to(device).train()
    parameters = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def save(epoch: int, batch: int) -> None:
        state = {"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict()}
        save_checkpoint(last, {**state, "rng": rng_state(), "epoch": epoch, "batch": batch, "provenance": provenance})

    # Resume by name from train/last.pt when it was written for these inputs.
    start_epoch, start_batch = 0, 0
    if last.exists():
        state = load_checkpoint(last)
        if state["provenance"] == provenance:
            model.load_state_dict(state["model"])
            heads.load_state_dict(state["heads"])
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            start_epoch, start_batch = state["epoch"], state["batch"]
            log.info("resuming round %d at epoch %d, batch %d from %s", round, start_epoch, start_batch, last)
        else:
            log.warning("%s was written for other inputs (labels or checkpoint changed): starting afresh", last)
    iteration = start_epoch * iterations_per_epoch + start_batch
    metrics = MetricsLog(Path(train_dir) / "metrics.tsv", resume_at=iteration)

    # The loop.
    log.info("round %d: %s on %d images, %d epochs x %d iterations of %d, heads %s", round, method, len(dataset),
             epochs, iterations_per_epoch, batch_size, targets)  # fmt: skip
    for epoch in range(start_epoch, epochs):
        indices, rotations = sampler.epoch(epoch)
        batches = epoch_batches(indices, rotations, batch_size, start_batch, seed, epoch)
        # Its own generator: creating the loader must not draw from the global RNG (dropout's), or a
        # loader created at resume would shift every later draw.
        loader = DataLoader(
            dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        tick = time.perf_counter()
        for batch, (x, index, rotation) in enumerate(loader, start=start_batch):
            x, rotation = x.to(device, non_blocking=True), rotation.to(device)
            super_target = super_class(targets, super_clusters[index].to(device), rotation)
            losses = heads(model(x), super_target, sub_clusters[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()

            now, iteration = time.perf_counter(), iteration + 1
            row = {key: value.item() for key, value in losses.items()}
            metrics.write(round=round, epoch=epoch, iteration=iteration - 1, lr=lr, images_per_s=len(x) / (now - tick),
                          **row)  # fmt: skip
            tick = now
            if iteration % checkpoint_every == 0:
                metrics.flush()
                save(epoch, batch + 1)
            if batch % max(1, iterations_per_epoch // 5) == 0 or batch + 1 == iterations_per_epoch:
                log.info("epoch %d/%d batch %d/%d: %s", epoch + 1, epochs, batch + 1, iterations_per_epoch,
                         " ".join(f"{k} {v:.3f}" for k, v in row.items()))  # fmt: skip
        metrics.flush()
        start_batch = 0
        save(epoch + 1, 0)
    metrics.close()

    final = {"arch": previous["arch"], "sobel": previous["sobel"], "round": round, "model": model.state_dict()}
    save_checkpoint(out, {**final, "heads": heads.state_dict(), "targets": targets, **provenance})
    log.info("round %d's block done: %s", round, out)
