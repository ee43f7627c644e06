"""The training block of a round: ``epochs`` epochs on the round's pseudo-labels, resumable exactly.

``train_block`` reads top to bottom: ranks, data, networks, optimiser, resume, loop. It saves
``train/last.pt`` (model, heads, optimiser, sampler position, every rank's RNG state) every
``checkpoint_every`` iterations and at every epoch end; run again after a kill, it resumes
from there and ends with the same weights as an uninterrupted run. Augmentation is seeded
per sample from (seed, epoch, group, position), so it depends neither on DataLoader
workers nor on where the block was interrupted nor on how many ranks share a batch.

Ranks (DeeperCluster, section "Distributed training"): when the number of ranks is a
multiple of the number of super-classes, ranks form one training group per super-class
and each rank of group g sees only super-class g's images at its rotation; the backbone
and the super-class head are shared by all ranks, a sub-class head only inside its group.
Otherwise every rank takes its share of each global batch. Either way BatchNorm statistics
are computed over the global batch and every rank holds identical weights.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deepercluster.checkpoints import load_checkpoint, load_model, save_checkpoint
from deepercluster.data import ImageDataset, read_manifest, train_transform
from deepercluster.distributed import (
    all_gather_objects,
    all_reduce_sum,
    global_batchnorm,
    init_distributed,
    is_main_process,
    synchronise_gradients,
)
from deepercluster.files import sha256
from deepercluster.labels import read_labels
from deepercluster.objectives import ROTATIONS, Heads, Targets, super_class, targets_for
from deepercluster.sampler import UniformClusterSampler

log = logging.getLogger(__name__)

METRICS = [
    *("round", "epoch", "iteration", "lr", "images_per_s"),
    *("loss", "loss_super", "acc_super", "loss_sub", "acc_sub"),
]


@dataclass(frozen=True)
class Layout:
    """How the ranks share a block: ``groups`` training groups; this rank is ``part`` of the ``parts`` of ``group``."""

    groups: int
    group: int
    part: int
    parts: int


def layout_for(targets: Targets, rank: int, world_size: int) -> Layout:
    """The paper's layout (a group per super-class) when the ranks divide evenly, else one group of all ranks."""
    groups = targets.super_classes
    if world_size > 1 and groups > 1 and world_size % groups == 0:
        parts = world_size // groups
        return Layout(groups, rank // parts, rank % parts, parts)
    return Layout(1, 0, rank, world_size)


def group_sampler(targets: Targets, layout: Layout, clusters: pd.DataFrame, seed: int) -> UniformClusterSampler:
    """Uniform over the clusters of this rank's group: its super-cluster's images at its rotation."""
    flat = clusters["super_cluster"].to_numpy() * (clusters["sub_cluster"].max() + 1) + clusters["sub_cluster"]
    images, rotations = None, list(range(ROTATIONS)) if targets.rotates else [0]
    if layout.groups > 1:  # super-class g = (super-cluster g // 4, rotation g % 4); RotNet: rotation g
        rotations = [layout.group % ROTATIONS]
        if targets.method == "deepercluster":
            images = np.flatnonzero(clusters["super_cluster"].to_numpy() == layout.group // ROTATIONS)
    group_seed = int(np.random.SeedSequence([seed, layout.group]).generate_state(1)[0])
    return UniformClusterSampler(
        flat.to_numpy(), rotations=rotations, seed=group_seed, images=images, draws=len(clusters) // layout.groups
    )


class RotatedImages(Dataset):
    """Item (index, rotation, sample_seed) -> (augmented image turned by rotation x 90 degrees, index, rotation)."""

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


def rank_batches(
    indices: np.ndarray, rotations: np.ndarray, group_batch: int, layout: Layout, start: int, seed: int, epoch: int
) -> list[list[tuple[int, int, int]]]:
    """This rank's share of each of the group's batches from batch ``start`` on, as (index, rotation, sample_seed).

    The last incomplete batch is dropped.
    """
    keys = [
        (int(i), int(r), int(np.random.SeedSequence([seed, epoch, layout.group, p]).generate_state(1)[0]))
        for p, (i, r) in enumerate(zip(indices, rotations, strict=True))
    ]
    share = group_batch // layout.parts
    first = [b * group_batch + layout.part * share for b in range(start, len(keys) // group_batch)]
    return [keys[f : f + share] for f in first]


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
    """``metrics.tsv``, one row per iteration (rank 0 writes); on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_at: int) -> None:
        self.file = None
        if not is_main_process():
            return
        rows = pd.read_csv(path, sep="\t") if path.exists() and resume_at else pd.DataFrame(columns=METRICS)
        rows[rows["iteration"] < resume_at].to_csv(path, sep="\t", index=False)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed by close())
        self.writer = csv.DictWriter(self.file, METRICS, delimiter="\t")

    def write(self, **row: float) -> None:
        if self.file:
            self.writer.writerow(row)

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def mean_over_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """Each loss and accuracy averaged over the ranks (one all-reduce)."""
    stacked = all_reduce_sum(torch.stack([v.detach().float() for v in values.values()])) / world_size
    return dict(zip(values, stacked.tolist(), strict=True))


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
    dropout: float = 0.5,
    image_size: int = 32,
    workers: int = 0,
    checkpoint_every: int = 1000,
    seed: int = 0,
) -> None:
    """Stage 'train' (inside its launcher): round ``round``'s training block; writes ``out``.

    ``batch_size`` is the global batch, split evenly over the ranks.
    """
    # Ranks: one process, or every task of the job.
    context = init_distributed()
    device, rank, world_size = context.device, context.rank, context.world_size
    if batch_size % world_size:
        raise ValueError(f"train.batch_size {batch_size} is not a multiple of the {world_size} ranks: change either")
    last = Path(train_dir) / "last.pt"
    Path(train_dir).mkdir(parents=True, exist_ok=True)
    provenance = {"previous_sha256": sha256(previous_checkpoint), "labels_sha256": labels and sha256(labels)}
    provenance |= {"method": method}

    # Data: the images, their clusters, this rank's group and a sampler uniform over its clusters.
    images = read_manifest(manifest)
    clusters = cluster_table(images, None if method == "rotnet" else labels)
    targets = targets_for(method, clusters.groupby("super_cluster")["sub_cluster"].max().add(1).tolist())
    layout = layout_for(targets, rank, world_size)
    sampler = group_sampler(targets, layout, clusters, seed)
    group_batch = min(batch_size // layout.groups, len(sampler))
    iterations_per_epoch = len(sampler) // group_batch
    dataset = RotatedImages(ImageDataset(images["path"].tolist(), images["id"].tolist(), train_transform(image_size)))
    super_clusters, sub_clusters = (torch.tensor(clusters[c].to_numpy()) for c in ("super_cluster", "sub_cluster"))

    # Networks and optimiser: the backbone carries over, the heads are new each round.
    model, previous = load_model(previous_checkpoint)
    torch.manual_seed(seed)  # the same heads on every rank
    heads = Heads(model.feature_dim, targets)
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))  # each rank's dropout
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
    model = global_batchnorm(model)
    model.to(device).train()
    heads.to(device).train()
    shared = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    in_group = {id(p) for p in heads.sub_class.parameters()}
    divisors = [layout.parts if id(p) in in_group else world_size for p in shared]
    optimizer = torch.optim.SGD(shared, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def save(epoch: int, batch: int) -> None:
        rngs = all_gather_objects(rng_state())
        if is_main_process():
            state = {"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict()}
            save_checkpoint(last, {**state, "rng": rngs, "epoch": epoch, "batch": batch, "provenance": provenance})

    # Resume by name from train/last.pt when it was written for these inputs.
    start_epoch, start_batch = 0, 0
    state = load_checkpoint(last) if last.exists() else None
    if state is not None and state["provenance"] == provenance:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        if len(state["rng"]) == world_size:
            set_rng_state(state["rng"][rank])
        else:
            log.warning(
                "%s was saved by %d ranks, not %d: the random state restarts", last, len(state["rng"]), world_size
            )
        start_epoch, start_batch = state["epoch"], state["batch"]
        log.info("resuming round %d at epoch %d, batch %d from %s", round, start_epoch, start_batch, last)
    elif state is not None:
        log.warning("%s was written for other inputs (labels or checkpoint changed): starting afresh", last)
    iteration = start_epoch * iterations_per_epoch + start_batch
    metrics = MetricsLog(Path(train_dir) / "metrics.tsv", resume_at=iteration)

    # The loop.
    log.info("round %d: %s on %d images, %d epochs x %d iterations of %d on %d ranks (%s), heads %s", round, method,
             len(dataset), epochs, iterations_per_epoch, batch_size, world_size, layout, targets)  # fmt: skip
    for epoch in range(start_epoch, epochs):
        indices, rotations = sampler.epoch(epoch)
        batches = rank_batches(indices, rotations, group_batch, layout, start_batch, seed, epoch)
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
            synchronise_gradients(shared, divisors)
            optimizer.step()

            row = mean_over_ranks(losses, world_size)
            now, iteration = time.perf_counter(), iteration + 1
            metrics.write(round=round, epoch=epoch, iteration=iteration - 1, lr=lr,
                          images_per_s=len(x) * world_size / (now - tick), **row)  # fmt: skip
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

    if is_main_process():
        final = {"arch": previous["arch"], "sobel": previous["sobel"], "round": round, "model": model.state_dict()}
        save_checkpoint(out, {**final, "heads": heads.state_dict(), "targets": targets, **provenance})
        log.info("round %d's block done: %s", round, out)
